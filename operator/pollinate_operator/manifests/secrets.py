"""Secrets of a Federation: its CA, the server's TLS certificate, the operator's control
token, one identity per site."""

from __future__ import annotations

import base64
import datetime as dt
import secrets

from ..pki import CertificateAuthority, ServerCertificate, SiteKey
from . import names


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _secret(name: str, namespace: str, federation: str, data: dict[str, bytes],
            annotations: dict[str, str] | None = None, type: str = "Opaque") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": type,
        "metadata": {
            "name": name, "namespace": namespace,
            "labels": {names.FEDERATION_LABEL: names.label_value(federation), **names.MANAGED_BY},
            "annotations": annotations or {},
        },
        "data": {k: _b64(v) for k, v in data.items()},
    }


def ca_secret(federation: str, namespace: str, ca: CertificateAuthority, rotation: int,
              previous: CertificateAuthority | None = None,
              rotated_at: dt.datetime | None = None) -> dict:
    """The Federation's CA; after a rotation, for its overlap, the CA it replaced as well (it
    still signs the server certificate, so sites that have only it are not cut off)."""
    data = {"ca.crt": ca.cert_pem, "ca.key": ca.key_pem}
    annotations = {names.ROTATION_ANNOTATION: str(rotation)}
    if previous is not None and rotated_at is not None:
        data |= {PREVIOUS_CA_CERT: previous.cert_pem, PREVIOUS_CA_KEY: previous.key_pem}
        annotations[names.CA_ROTATED_AT_ANNOTATION] = rotated_at.isoformat()
    return _secret(names.ca_secret(federation), namespace, federation, data, annotations)


PREVIOUS_CA_CERT = "previous-ca.crt"
PREVIOUS_CA_KEY = "previous-ca.key"


def server_tls_secret(federation: str, namespace: str, trusted_ca_pem: bytes,
                      cert: ServerCertificate, rotation: int) -> dict:
    """The server's certificate and key, and as ca.crt the CAs to trust it by (the ingress
    controller verifies its hop to the server with them): one, or two during an overlap."""
    return _secret(names.server_tls_secret(federation), namespace, federation,
                   {"ca.crt": trusted_ca_pem, "tls.crt": cert.cert_pem, "tls.key": cert.key_pem},
                   {names.ROTATION_ANNOTATION: str(rotation)}, type="kubernetes.io/tls")


CONTROL_TOKEN_KEY = "token"


def new_control_token() -> str:
    return secrets.token_urlsafe(32)


def control_token_secret(federation: str, namespace: str, token: str) -> dict:
    """The credential only the operator presents to the server's control API; the server
    pod mounts it to check calls against (pollinate_runtime.server_gate)."""
    return _secret(names.control_token_secret(federation), namespace, federation,
                   {CONTROL_TOKEN_KEY: token.encode()})


def site_secret(federation: str, namespace: str, site: str, key: SiteKey | bytes,
                ca_cert_pem: bytes) -> dict:
    """A site's identity: its key pair, or only the public key a site brought (`bytes`, one
    OpenSSH line), whose private half the operator never holds; and the Federation's CA."""
    data = ({"site.pub": key} if isinstance(key, bytes)
            else {"site.key": key.private_openssh, "site.pub": key.public_openssh})
    body = _secret(names.site_secret(federation, site), namespace, federation,
                   {**data, "ca.crt": ca_cert_pem})
    body["metadata"]["labels"][names.SITE_LABEL] = site
    return body
