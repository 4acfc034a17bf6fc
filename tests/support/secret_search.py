"""Looking for secret values in text (logs, Events, objects) without ever printing them."""

from __future__ import annotations

import base64


def secret_forms(value: bytes) -> set[str]:
    """How a secret could show up in text: itself, each base64 line of a PEM body, and the
    base64 a Secret's data holds (whole, and in the 64-character runs a log line would cut)."""
    text = value.decode()
    forms = {text.strip()}
    forms |= {line.strip() for line in text.splitlines()
              if line.strip() and not line.startswith("-----")}
    encoded = base64.b64encode(value).decode()
    forms.add(encoded)
    forms |= {encoded[i:i + 64] for i in range(0, len(encoded) - 63, 64)}
    return {f for f in forms if len(f) >= 16}


def leaks(values: dict[str, set[str]], places: dict[str, str]) -> list[str]:
    """Which secret shows up where, named, never quoted."""
    return [f"{secret} in {place}" for place, text in places.items()
            for secret, forms in values.items() if any(f in text for f in forms)]
