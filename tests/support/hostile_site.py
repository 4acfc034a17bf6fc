"""A registered site gone wrong, for tests: it answers through Pollinate's real ClientApp and
the real Flower wire, but its trainer sends a malformed or poisoned update.

    python -m hostile_site --kind nan --server 127.0.0.1:9092 --ca ca.crt --key k --work-dir w
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from pollinate_runtime import messages as m
from pollinate_runtime.cli import free_port
from pollinate_runtime.site_trainer import TrainerServer

# A wrong dtype cannot leave Pollinate's ClientApp (it casts to the transport dtype); the
# validator's dtype checks are unit-tested on raw ArrayRecords instead.
KINDS = ("nan", "inf", "wrong-shape", "wrong-name", "missing", "huge-norm", "empty", "stale-round",
         "poison", "crash")


class HostileTrainer:
    """Stands in for SiteTrainer: same requests, bad answers."""

    def __init__(self, kind: str, site: str) -> None:
        self.kind = kind
        self.site = site

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        adapter = {k: np.array(v, dtype=np.float32) for k, v in (request.get("adapter") or {}).items()}
        metrics = {m.NUM_EXAMPLES: 100.0, m.TRAIN_LOSS: 0.1}
        if request["kind"] != "train":
            return {"adapter": None, "metrics": {}}
        if self.kind == "crash":
            raise RuntimeError("CUDA out of memory (simulated)")
        first = sorted(adapter)[0]
        if self.kind == "nan":
            adapter[first].flat[0] = np.nan
        elif self.kind == "inf":
            adapter[first].flat[0] = np.inf
        elif self.kind == "wrong-shape":
            adapter[first] = np.zeros((adapter[first].shape[0] + 1, 3), dtype=np.float32)
        elif self.kind == "wrong-name":
            adapter["base_model.model.lm_head.lora_A.weight"] = adapter.pop(first)
        elif self.kind == "missing":
            adapter.pop(first)
        elif self.kind == "huge-norm":
            # Huge, yet inside float16's range: the norm check must catch it, not the cast.
            adapter[first] = adapter[first] + 1e4
        elif self.kind == "empty":
            adapter = {}
        elif self.kind == "poison":
            # Pull every coordinate far (but within the norm bound) in one direction.
            adapter = {k: v - 0.5 * np.sign(v + 1e-3) for k, v in adapter.items()}
        answer: dict[str, Any] = {"adapter": adapter or None, "metrics": metrics}
        if self.kind == "stale-round":
            answer["round"] = int(request.get("round", 0)) - 1
        return answer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--site", required=True)
    parser.add_argument("--server", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--work-dir", required=True)
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    socket_path = work / f"trainer-{args.site}.sock"
    server = TrainerServer(HostileTrainer(args.kind, args.site), socket_path)  # type: ignore[arg-type]
    server.start()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "FLWR_HOME": str(work / "flwr"),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    command = [str(Path(sys.executable).parent / "flower-supernode"), "--superlink", args.server,
               "--root-certificates", args.ca, "--auth-supernode-private-key", args.key,
               "--node-config", f'site="{args.site}" trainer-socket="{socket_path}"',
               "--port", str(free_port())]
    return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
