"""TLS material and site identities of a Federation.

The server certificate names the ingress host, the in-cluster Service names and
127.0.0.1: the SuperLink's own executor connects to itself over TLS on 127.0.0.1, and a
certificate without that address leaves a server that accepts runs but never starts one.
Site keys are OpenSSH EC P-384 keys, the format Flower's SuperNode authentication reads.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .manifests.names import fit

CA_VALIDITY = dt.timedelta(days=3650)
SERVER_VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class CertificateAuthority:
    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class ServerCertificate:
    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class SiteKey:
    private_openssh: bytes
    public_openssh: bytes


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# X.509 (RFC 5280) allows a common name of at most 64 characters.
COMMON_NAME_MAX = 64


def _common_name(text: str) -> str:
    """`text`, or its start and a hash of all of it when longer than a common name may be."""
    return fit(text, COMMON_NAME_MAX)


def new_ca(common_name: str, now: dt.datetime | None = None) -> CertificateAuthority:
    common_name = _common_name(common_name)
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA384())
    )
    return CertificateAuthority(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def new_server_certificate(
    ca: CertificateAuthority, dns_names: list[str], ip_addresses: list[str] | None = None,
    now: dt.datetime | None = None, validity: dt.timedelta = SERVER_VALIDITY,
) -> ServerCertificate:
    """A certificate for the server, valid for `validity` or until its CA expires, whichever
    comes first (a certificate outliving its issuer would fail verification anyway)."""
    now = now or dt.datetime.now(dt.UTC)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    not_after = min(now + validity, ca_cert.not_valid_after_utc)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in (ip_addresses or ["127.0.0.1"])]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _common_name(dns_names[0]))]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return ServerCertificate(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def certificate_names(cert_pem: bytes) -> tuple[set[str], set[str]]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def not_after(cert_pem: bytes) -> dt.datetime:
    """When a certificate (the first in `cert_pem`) expires, in UTC."""
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def issued_by(cert_pem: bytes, ca_cert_pem: bytes) -> bool:
    """Whether the CA certificate `ca_cert_pem` signed `cert_pem` (its name and signature)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_cert_pem))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def bundle(*ca_cert_pems: bytes | None) -> bytes:
    """The CA certificates sites and the ingress trust, one after another (PEM allows it)."""
    return b"".join(pem if pem.endswith(b"\n") else pem + b"\n" for pem in ca_cert_pems if pem)


def new_site_key() -> SiteKey:
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption())
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return SiteKey(private, public)


def public_key_pem(public_openssh: bytes) -> bytes:
    """The SubjectPublicKeyInfo PEM Flower's control API registers."""
    key = serialization.load_ssh_public_key(public_openssh)
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(cert_pem: bytes) -> str:
    """A short, stable identifier of a certificate (for annotations, never a secret)."""
    return hashlib.sha256(cert_pem).hexdigest()[:16]
