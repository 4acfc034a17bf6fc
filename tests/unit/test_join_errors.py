"""`pollinate-client join` with a wrong input, or nothing to talk to, stops at once with one
line that names the flag, what was expected and how to fix it. Run as a person runs it (a
subprocess); no Flower server is needed (tests/integration/test_security.py has the ones that
need one: a wrong CA, a wrong server name, a refused or revoked key)."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from flower_processes import free_port
from pollinate_operator import pki

CLIENT = Path(sys.executable).parent / "pollinate-client"


pytestmark = pytest.mark.slow  # each test runs pollinate-client join in a process


@pytest.fixture(scope="module")
def site_files(tmp_path_factory) -> dict[str, Path]:
    """Everything a site needs, all valid: each test breaks one of them."""
    root = tmp_path_factory.mktemp("site")
    (root / "notes.txt").write_text("A note a site keeps to itself.\n")
    (root / "ca.crt").write_bytes(pki.new_ca("test federation CA").cert_pem)
    (root / "site.key").write_bytes(pki.new_site_key().private_openssh)
    return {"data": root / "notes.txt", "ca": root / "ca.crt", "key": root / "site.key"}


def join(site_files: dict[str, Path], tmp_path: Path, **changes: str | None) -> str:
    """Run `join` with the valid inputs except `changes` (None drops a flag); return the
    error line, after checking it is the only thing the person sees."""
    flags = {"server": f"127.0.0.1:{free_port()}", "site": "site-a",
             **{k: str(v) for k, v in site_files.items()}, "work-dir": str(tmp_path / "work")}
    flags.update(changes)
    argv = [str(CLIENT), "join", *(a for k, v in flags.items() if v is not None for a in (f"--{k}", v))]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("pollinate-client: error: "), line
    return line


def test_server_without_a_port_names_the_expected_form(site_files, tmp_path: Path) -> None:
    error = join(site_files, tmp_path, server="fl.example.org")
    assert "--server 'fl.example.org': expected host:port" in error and "status.endpoint" in error


def test_missing_data_file_names_the_flag_and_the_formats(site_files, tmp_path: Path) -> None:
    missing = tmp_path / "notes.jsonl"
    error = join(site_files, tmp_path, data=str(missing))
    assert f"--data {missing}: does not exist" in error and ".jsonl or .txt" in error


def test_empty_data_folder_names_the_formats_it_looks_for(site_files, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    error = join(site_files, tmp_path, data=str(tmp_path / "empty"))
    assert f"--data {tmp_path / 'empty'}:" in error and "holds no .jsonl or .txt files" in error


def test_no_ca_names_the_flag_and_where_the_ca_comes_from(site_files, tmp_path: Path) -> None:
    error = join(site_files, tmp_path, ca=None)
    assert "--ca is required" in error and "ca.crt" in error and "<federation>-site-<site>" in error


def test_ca_that_is_not_a_certificate_is_named(site_files, tmp_path: Path) -> None:
    error = join(site_files, tmp_path, ca=str(site_files["data"]))
    assert f"--ca {site_files['data']}: not a PEM certificate" in error and "ca.crt" in error


def test_pem_key_is_refused_as_not_openssh(site_files, tmp_path: Path) -> None:
    key = tmp_path / "site.pem"
    key.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    error = join(site_files, tmp_path, key=str(key))
    assert f"--key {key}: not an OpenSSH private key" in error and "site.key" in error


def test_openssh_key_that_is_not_ec_is_refused(site_files, tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    key.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    error = join(site_files, tmp_path, key=str(key))
    assert f"--key {key}: an OpenSSH key, but not an EC one" in error and "EC P-384" in error


def test_unreachable_server_is_named_with_what_to_check(site_files, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    error = join(site_files, tmp_path, server=f"127.0.0.1:{port}")
    assert f"cannot reach the server at 127.0.0.1:{port} (Connection refused)" in error
    assert "check --server" in error


@pytest.fixture
def plain_http_port() -> Iterator[int]:
    """A server that answers, but not with TLS (a wrong port of the right host)."""
    httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_server_that_does_not_speak_tls_is_named(site_files, tmp_path: Path, plain_http_port: int) -> None:
    error = join(site_files, tmp_path, server=f"127.0.0.1:{plain_http_port}")
    assert f"the server at 127.0.0.1:{plain_http_port} does not answer with TLS" in error
    assert "--server" in error


@pytest.mark.parametrize("flag", ["rejoin-seconds", "reconnect-seconds"])
def test_negative_retry_windows_name_the_flag(site_files, tmp_path: Path, flag: str) -> None:
    error = join(site_files, tmp_path, **{flag: "-5"})
    assert f"--{flag} -5: expected seconds, 0 or more" in error


@pytest.mark.parametrize("seconds", ["5", "3600", "nan"])
def test_a_heartbeat_outside_what_the_server_accepts_names_the_range(site_files, tmp_path: Path,
                                                                      seconds: str) -> None:
    error = join(site_files, tmp_path, **{"heartbeat-seconds": seconds})
    assert f"--heartbeat-seconds {seconds}: expected seconds from 10 to 1800" in error
