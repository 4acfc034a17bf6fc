"""The server's metrics endpoint (pollinate_runtime.server_metrics): where it listens and what
it serves. Serving over HTTP: tests/integration/test_server_metrics_endpoint.py; the sum over the
SuperLink's and the ServerApp's processes, with the real server: tests/integration/test_engine.py."""

from __future__ import annotations

import pytest
from pollinate_runtime import server_metrics
from pollinate_runtime.server_metrics import ADDRESS_ENV, parse_address


@pytest.mark.parametrize(("text", "expected"), [
    ("0.0.0.0:9190", ("0.0.0.0", 9190)), (":9190", ("0.0.0.0", 9190)),
    ("127.0.0.1:1", ("127.0.0.1", 1)), ("[::1]:9190", ("::1", 9190)),
])
def test_an_address_is_host_and_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9190", "host:", "host:port", "host:70000", "host:-1"])
def test_a_wrong_address_is_refused_naming_the_variable_and_the_form(text: str) -> None:
    with pytest.raises(ValueError, match=f"{ADDRESS_ENV}=.*expected host:port"):
        parse_address(text)


def test_without_an_address_nothing_listens() -> None:
    assert server_metrics.serve({}) is None
    assert server_metrics.serve({ADDRESS_ENV: "  "}) is None
