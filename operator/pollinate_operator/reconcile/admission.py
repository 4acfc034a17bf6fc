"""What the operator refuses to do for a Federation, whoever wrote it: the hub chart's admission
policy (charts/pollinate/templates/admission.yaml) checked again here, for a cluster where the
policy is not installed (older than Kubernetes 1.34, or `admission.enabled: false`).

The API server's policy also checks the author's own rights on the Secrets, ConfigMaps and
claims a Federation names; the operator cannot (it does not know who wrote the object), so
only the rules that depend on the object alone are repeated: images, hostPath data and Ingress
annotations. The chart passes both the same values (`admission` in its values.yaml).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..api.federation import FederationSpec

ENV = "POLLINATE_ADMISSION"


@dataclass(frozen=True)
class AdmissionPolicy:
    # Empty: any image (an operator run without the chart's values: development, tests).
    allowed_image_prefixes: tuple[str, ...] = ()
    allow_host_path: bool = True
    denied_ingress_annotations: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, text: str) -> AdmissionPolicy:
        """The chart's `admission` values as JSON (`POLLINATE_ADMISSION`); an error names the
        variable and the value."""
        if not text.strip():
            return cls()
        try:
            values = json.loads(text)
            prefixes = values["allowedImagePrefixes"]
            host_path = values["allowHostPath"]
            denied = values["deniedIngressAnnotations"]
            if not (isinstance(prefixes, list) and all(isinstance(p, str) for p in prefixes)
                    and isinstance(host_path, bool)
                    and isinstance(denied, list) and all(isinstance(d, str) for d in denied)):
                raise TypeError("expected allowedImagePrefixes and deniedIngressAnnotations as "
                                "lists of strings and allowHostPath as true or false")
            for pattern in denied:
                re.compile(pattern)
        except (ValueError, KeyError, TypeError, re.error) as err:
            raise ValueError(f"{ENV}: {err} (the hub chart's admission values as JSON)") from err
        return cls(tuple(prefixes), host_path, tuple(denied))


def refusals(spec: FederationSpec, policy: AdmissionPolicy) -> list[str]:
    """Why this Federation may not be reconciled under `policy`, one line per field; empty if
    it may. Worded as the API server's policy words them."""
    found: list[str] = []
    if policy.allowed_image_prefixes:
        images = (("spec.server.image", spec.server.image), ("spec.clientImage", spec.client_image))
        for field, image in images:
            if not any(image.startswith(p) for p in policy.allowed_image_prefixes):
                found.append(f'{field}: image "{image}" is not under an allowed prefix '
                             f'({", ".join(policy.allowed_image_prefixes)}; the hub chart value '
                             "admission.allowedImagePrefixes)")
    if not policy.allow_host_path:
        for site in spec.sites:
            if site.data is not None and site.data.host_path is not None:
                found.append(f"spec.sites[{site.name}].data.hostPath: hostPath data is not allowed "
                             "in this cluster (the hub chart value admission.allowHostPath); use "
                             "a persistentVolumeClaim")
    annotations = (spec.server.ingress.annotations or {}) if spec.server.ingress else {}
    denied = sorted(k for k in annotations if any(re.search(p, k) for p in policy.denied_ingress_annotations))
    if denied:
        found.append("spec.server.ingress.annotations: " + ", ".join(f'"{k}"' for k in denied)
                     + " may not be set on the server Ingress (the hub chart value "
                     "admission.deniedIngressAnnotations)")
    return found
