"""Two testbeds side by side (a second one on shifted ports) never share a state folder: the
second would otherwise take over the first's kubeconfig, S3 settings and process ids, and
stop its processes when it goes down."""

from __future__ import annotations

from pathlib import Path

import pytest
from pollinate_testbed.cluster import default_state_dir


def test_each_port_offset_has_its_own_state_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLLINATE_TESTBED_DIR", raising=False)
    monkeypatch.delenv("POLLINATE_TESTBED_PORT_OFFSET", raising=False)
    first = default_state_dir()
    monkeypatch.setenv("POLLINATE_TESTBED_PORT_OFFSET", "0")
    assert default_state_dir() == first and first.name == ".testbed"
    monkeypatch.setenv("POLLINATE_TESTBED_PORT_OFFSET", "1000")
    assert default_state_dir() == first.with_name(".testbed-1000")


def test_an_explicit_state_folder_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POLLINATE_TESTBED_PORT_OFFSET", "1000")
    monkeypatch.setenv("POLLINATE_TESTBED_DIR", str(tmp_path))
    assert default_state_dir() == tmp_path
