"""The operator's Flower client meets a server whose certificate is wrong: it says what is
wrong (expired, another name's, another CA's) instead of "unreachable". A real TLS handshake
on loopback with certificates from the operator's own PKI; no Flower server is needed to
present one."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pollinate_operator import pki
from pollinate_operator.clients.flower import FlowerCertificateInvalid, FlowerControl


@contextmanager
def tls_server(cert: pki.ServerCertificate, folder: Path) -> Iterator[int]:
    """A loopback listener that completes TLS handshakes with `cert` and closes."""
    (folder / "tls.crt").write_bytes(cert.cert_pem)
    (folder / "tls.key").write_bytes(cert.key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(folder / "tls.crt", folder / "tls.key")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client refused the certificate: what the tests want

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


CA = pki.new_ca("federation CA")


@pytest.mark.parametrize(("cert", "says"), [
    (pki.new_server_certificate(CA, ["localhost"], now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
                                validity=dt.timedelta(days=1)), "the server's certificate has expired"),
    (pki.new_server_certificate(CA, ["other.example.org"], ip_addresses=["10.0.0.1"]),
     "the server's certificate is not valid for 127.0.0.1:"),
    (pki.new_server_certificate(pki.new_ca("someone else's CA"), ["localhost"]),
     "the server's certificate is not signed by the Federation's CA"),
], ids=["expired", "other-name", "other-ca"])
def test_a_wrong_server_certificate_is_named_for_what_is_wrong(
        cert: pki.ServerCertificate, says: str, tmp_path: Path) -> None:
    with tls_server(cert, tmp_path) as port, \
            FlowerControl(f"127.0.0.1:{port}", CA.cert_pem, "token") as control, \
            pytest.raises(FlowerCertificateInvalid, match=says):
        control.nodes()
