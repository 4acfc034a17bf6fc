"""The Federation's TLS material and site identities, and the Secrets that carry them."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pollinate_operator import pki
from pollinate_operator.manifests import names, secrets

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
DNS = ["fl.pollinate.localhost", "clinical-notes-server.research.svc"]


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.new_ca("pollinate research/clinical-notes CA", now=NOW)


@pytest.fixture(scope="module")
def server_cert(ca: pki.CertificateAuthority) -> pki.ServerCertificate:
    return pki.new_server_certificate(ca, DNS, now=NOW)


@pytest.fixture(scope="module")
def site_key() -> pki.SiteKey:
    return pki.new_site_key()


def decoded(secret: dict) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


def test_the_ca_is_a_self_signed_p384_authority_for_ten_years(ca: pki.CertificateAuthority) -> None:
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert cert.subject == cert.issuer
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp384r1"
    assert cert.not_valid_after_utc - NOW == pki.CA_VALIDITY
    key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_the_server_certificate_is_signed_by_the_ca_for_its_names_and_loopback(
        ca: pki.CertificateAuthority, server_cert: pki.ServerCertificate) -> None:
    cert = x509.load_pem_x509_certificate(server_cert.cert_pem)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    cert.verify_directly_issued_by(ca_cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == DNS
    # The SuperLink's own executor dials itself on 127.0.0.1 over TLS.
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert pki.certificate_names(server_cert.cert_pem) == (set(DNS), {"127.0.0.1"})
    assert cert.not_valid_after_utc - NOW == pki.SERVER_VALIDITY
    key = serialization.load_pem_private_key(server_cert.key_pem, password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_site_keys_are_openssh_p384_pairs_registered_as_pem(site_key: pki.SiteKey) -> None:
    assert site_key.public_openssh.startswith(b"ecdsa-sha2-nistp384 ")
    assert site_key.private_openssh.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    private = serialization.load_ssh_private_key(site_key.private_openssh, password=None)
    pem = pki.public_key_pem(site_key.public_openssh)
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    loaded = serialization.load_pem_public_key(pem)
    assert loaded.public_numbers() == private.public_key().public_numbers()
    assert pki.new_site_key().public_openssh != site_key.public_openssh  # one pair per site


def test_fingerprint_is_short_stable_and_tells_certificates_apart(
        ca: pki.CertificateAuthority, server_cert: pki.ServerCertificate) -> None:
    assert pki.fingerprint(server_cert.cert_pem) == pki.fingerprint(server_cert.cert_pem)
    assert len(pki.fingerprint(server_cert.cert_pem)) == 16
    assert pki.fingerprint(server_cert.cert_pem) != pki.fingerprint(ca.cert_pem)


def test_ca_secret_holds_the_ca_and_its_rotation(ca: pki.CertificateAuthority) -> None:
    secret = secrets.ca_secret("clinical-notes", "research", ca, 3)
    assert secret["metadata"]["name"] == "clinical-notes-ca"
    assert secret["metadata"]["namespace"] == "research"
    assert secret["type"] == "Opaque"
    assert decoded(secret) == {"ca.crt": ca.cert_pem, "ca.key": ca.key_pem}
    assert secret["metadata"]["annotations"] == {names.ROTATION_ANNOTATION: "3"}
    assert secret["metadata"]["labels"] == {
        "pollinate.dev/federation": "clinical-notes", **names.MANAGED_BY}


def test_during_an_overlap_the_ca_secret_keeps_the_previous_ca_and_when_it_was_replaced(
        ca: pki.CertificateAuthority) -> None:
    import datetime as dt

    old = pki.new_ca("old")
    at = dt.datetime(2026, 12, 8, 12, 0, tzinfo=dt.UTC)
    secret = secrets.ca_secret("clinical-notes", "research", ca, 4, old, at)
    assert decoded(secret) == {"ca.crt": ca.cert_pem, "ca.key": ca.key_pem,
                               "previous-ca.crt": old.cert_pem, "previous-ca.key": old.key_pem}
    assert secret["metadata"]["annotations"][names.CA_ROTATED_AT_ANNOTATION] == at.isoformat()


def test_a_bundle_of_two_cas_verifies_a_certificate_of_either_and_validity_follows_the_request(
        ca: pki.CertificateAuthority) -> None:
    import datetime as dt
    import ssl
    import tempfile

    old = pki.new_ca("old")
    now = dt.datetime.now(dt.UTC)
    cert = pki.new_server_certificate(old, ["fl.example.org"], now=now, validity=dt.timedelta(minutes=5))
    assert pki.not_after(cert.cert_pem) == (now + dt.timedelta(minutes=5)).replace(microsecond=0)
    assert pki.issued_by(cert.cert_pem, old.cert_pem) and not pki.issued_by(cert.cert_pem, ca.cert_pem)
    # Never past its CA's own expiry.
    long = pki.new_server_certificate(old, ["x"], now=now, validity=dt.timedelta(days=365 * 20))
    assert pki.not_after(long.cert_pem) <= pki.not_after(old.cert_pem)
    bundle = pki.bundle(ca.cert_pem, old.cert_pem)
    with tempfile.NamedTemporaryFile() as f:
        f.write(bundle)
        f.flush()
        context = ssl.create_default_context(cafile=f.name)
    assert len(context.get_ca_certs()) == 2
    assert pki.bundle(ca.cert_pem, None) == ca.cert_pem


def test_server_tls_secret_is_a_tls_secret_with_the_ca(
        ca: pki.CertificateAuthority, server_cert: pki.ServerCertificate) -> None:
    secret = secrets.server_tls_secret("clinical-notes", "research", ca.cert_pem, server_cert, 0)
    assert secret["metadata"]["name"] == "clinical-notes-server-tls"
    assert secret["type"] == "kubernetes.io/tls"
    # ca.key never leaves the CA Secret: the server pod mounts only this one.
    assert decoded(secret) == {"ca.crt": ca.cert_pem, "tls.crt": server_cert.cert_pem,
                               "tls.key": server_cert.key_pem}
    assert secret["metadata"]["annotations"] == {names.ROTATION_ANNOTATION: "0"}


def test_site_secret_is_labelled_with_its_site_and_carries_key_and_ca(
        ca: pki.CertificateAuthority, site_key: pki.SiteKey) -> None:
    secret = secrets.site_secret("clinical-notes", "research", "hospital-a", site_key, ca.cert_pem)
    assert secret["metadata"]["name"] == "clinical-notes-site-hospital-a"
    assert secret["metadata"]["labels"] == {
        "pollinate.dev/federation": "clinical-notes", "pollinate.dev/site": "hospital-a",
        **names.MANAGED_BY}
    assert decoded(secret) == {"site.key": site_key.private_openssh,
                               "site.pub": site_key.public_openssh, "ca.crt": ca.cert_pem}
    assert secret["metadata"]["annotations"] == {}


def test_a_federation_name_of_any_length_gets_a_ca_and_a_server_certificate() -> None:
    long = "clinical-notes-" * 17
    ca = pki.new_ca(f"pollinate research/{long} CA")
    other = pki.new_ca(f"pollinate research/{long}x CA")
    cert = pki.new_server_certificate(ca, [f"{'a' * 63}.{'b' * 63}.svc.cluster.local"])
    assert cert.cert_pem and pki.certificate_names(cert.cert_pem)
    subject = x509.load_pem_x509_certificate(ca.cert_pem).subject.rfc4514_string()
    assert len(subject) <= 3 + 64 and subject != x509.load_pem_x509_certificate(
        other.cert_pem).subject.rfc4514_string()
