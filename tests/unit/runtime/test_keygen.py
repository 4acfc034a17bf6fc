"""`pollinate-client keygen`: a site makes its own key pair; the public line is what the
Federation's `sites[].publicKey` accepts, and the private key stays on the site."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from pollinate_runtime import cli

CRD = Path(__file__).resolve().parents[3] / "crds/federation.yaml"


def public_key_pattern() -> str:
    crd = yaml.safe_load(CRD.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec["properties"]["sites"]["items"]["properties"]["publicKey"]["pattern"]


def test_the_key_is_written_0600_and_its_public_line_fits_the_federation(tmp_path: Path, capsys) -> None:
    out = tmp_path / "keys" / "site.key"
    assert cli.main(["keygen", "--out", str(out), "--comment", "alice@laptop"]) == 0
    public = capsys.readouterr().out.strip()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    cli.check_key(out)  # what join accepts as --key
    assert re.match(public_key_pattern(), public), public
    private = serialization.load_ssh_private_key(out.read_bytes(), password=None)
    ours = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                            serialization.PublicFormat.OpenSSH).decode()
    assert public == f"{ours} alice@laptop"


def test_an_existing_key_is_never_overwritten(tmp_path: Path, capsys) -> None:
    out = tmp_path / "site.key"
    out.write_text("the key this site registered")
    assert cli.main(["keygen", "--out", str(out)]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert out.read_text() == "the key this site registered"
