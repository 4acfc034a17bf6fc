"""The site trainer's Unix socket has a path short enough to bind, wherever the work folder
is (a laptop's deep home folder, a test's temporary tree), and only its user can reach it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pollinate_runtime.site_trainer import SOCKET_PATH_MAX, TrainerServer, call_trainer, trainer_socket_path


class Echo:
    def handle(self, request: dict) -> dict:
        return {"adapter": None, "metrics": {"echo": float(request["n"])}}


def test_a_short_work_folder_keeps_the_socket_in_it(tmp_path: Path) -> None:
    work = Path("/tmp") / f"w{os.getpid()}"
    assert trainer_socket_path(work, "site-a") == work / "trainer-site-a.sock"


def test_a_deep_work_folder_gets_a_short_private_socket_that_binds_and_answers(tmp_path: Path) -> None:
    work = tmp_path.joinpath(*(["a-rather-long-folder-name"] * 8))
    assert len(str(work)) > 200
    path = trainer_socket_path(work, "site-a")
    assert len(os.fsencode(path)) <= SOCKET_PATH_MAX
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and path.parent.stat().st_uid == os.getuid()
    assert trainer_socket_path(work, "site-b") != path
    assert trainer_socket_path(work, "site-a") == path  # stable: the ClientApp is told it once
    server = TrainerServer(Echo(), path)  # type: ignore[arg-type]
    server.start()
    try:
        assert call_trainer(path, {"kind": "train", "n": 3})["metrics"] == {"echo": 3.0}
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        server.stop()
