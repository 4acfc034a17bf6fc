"""A registered site gone wrong, for tests: it answers through Pollinate's real ClientApp and
the real Flower wire, but its trainer sends a malformed or poisoned update.

    python -m hostile_site --kind nan --server 127.0.0.1:9092 --ca ca.crt --key k --work-dir w

`--kind nan,inf` goes wrong one way in round 1 and another in round 2 (round r takes the
(r-1)th kind, cycling): one site process, with its SuperNode and ClientApps, tests two kinds.

Pollinate's ClientApp casts whatever the trainer returns to the transport dtype, so the
RECORD_KINDS go one step further: their ClientApp process writes the Flower record itself
(hostile_record/sitecustomize.py swaps the ClientApp's encoder), in a dtype the server does
not accept, far larger than the adapter's layout allows, or scaled a million times.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from pollinate_runtime import messages as m
from pollinate_runtime.cli import parse_server, supernode_command, supernode_env
from pollinate_runtime.site_trainer import TrainerServer, trainer_socket_path
from pollinate_runtime.superexec import WARM_ENV
from pollinate_runtime.wire import LAYOUT, PACKED_STYPE, TENSORS, to_record

RECORD_KINDS = ("float64", "int8", "oversized", "scaled-1e6")
# A well-formed adapter (the one it was sent) with a claimed example count.
EXAMPLE_CLAIMS = {"examples-nan": float("nan"), "examples-inf": float("inf"), "examples-negative": -1.0,
                  "examples-zero": 0.0, "examples-1e9": 1e9, "examples-1e300": 1e300}
# What a site of these kinds says of every adapter it evaluates (in its train replies and in
# the last round's evaluate): a loss no model has, or a perfect score on a claimed count.
EVAL_CLAIMS: dict[str, dict[str, float]] = {
    "nan": {m.EVAL_LOSS: float("nan"), m.EVAL_EXAMPLES: 10.0},
    "inf": {m.EVAL_LOSS: float("inf"), m.EVAL_EXAMPLES: 10.0},
    **{kind: {m.EVAL_LOSS: 0.0, m.EVAL_EXAMPLES: claim} for kind, claim in EXAMPLE_CLAIMS.items()},
}
KINDS = ("nan", "inf", "wrong-shape", "wrong-name", "missing", "huge-norm", "empty", "stale-round",
         "poison", "crash", *RECORD_KINDS, *EXAMPLE_CLAIMS)
HOSTILE_RECORD_ENV = "POLLINATE_HOSTILE_RECORD"
OVERSIZED_EXTRA_BYTES = 32 << 20  # the tiny test adapter is a few kilobytes


def kind_in_round(kinds: tuple[str, ...], round_: int) -> str:
    """The kind a site scheduled `kinds` plays in `round_` (1, 2, ...)."""
    return kinds[(max(round_, 1) - 1) % len(kinds)]


def parse_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(text.split(","))
    wrong = [k for k in kinds if k not in KINDS]
    if wrong:
        raise argparse.ArgumentTypeError(f"{wrong}: expected kinds of {KINDS}")
    if len(kinds) > 1 and set(kinds) & set(RECORD_KINDS):
        # Their ClientApp's environment names one kind for the whole run.
        raise argparse.ArgumentTypeError(f"{RECORD_KINDS} cannot change from round to round")
    return kinds


class HostileTrainer:
    """Stands in for SiteTrainer: same requests, bad answers."""

    def __init__(self, kinds: tuple[str, ...], site: str) -> None:
        self.kinds = kinds
        self.site = site

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("refused"):  # what the server told this site (the test reads it)
            print(f"the server refused this site's last reply: {request['refused']}", flush=True)
        kind = kind_in_round(self.kinds, int(request.get("round", 1)))
        adapter = {k: np.array(v, dtype=np.float32) for k, v in (request.get("adapter") or {}).items()}
        claims = EVAL_CLAIMS.get(kind, {}) if request["kind"] != "init" else {}
        metrics = {m.NUM_EXAMPLES: EXAMPLE_CLAIMS.get(kind, 100.0), m.TRAIN_LOSS: 0.1, **claims}
        if request["kind"] != "train":
            return {"adapter": None, "metrics": claims}
        if kind == "crash":
            raise RuntimeError("CUDA out of memory (simulated)")
        first = sorted(adapter)[0]
        if kind == "nan":
            adapter[first].flat[0] = np.nan
        elif kind == "inf":
            adapter[first].flat[0] = np.inf
        elif kind == "wrong-shape":
            adapter[first] = np.zeros((adapter[first].shape[0] + 1, 3), dtype=np.float32)
        elif kind == "wrong-name":
            adapter["base_model.model.lm_head.lora_A.weight"] = adapter.pop(first)
        elif kind == "missing":
            adapter.pop(first)
        elif kind == "huge-norm":
            # Huge, yet inside float16's range: the norm check must catch it, not the cast.
            adapter[first] = adapter[first] + 1e4
        elif kind == "empty":
            adapter = {}
        elif kind == "poison":
            # Pull every coordinate far (but within the norm bound) in one direction.
            adapter = {k: v - 0.5 * np.sign(v + 1e-3) for k, v in adapter.items()}
        # RECORD_KINDS: an honest adapter here; their ClientApp spoils the record it is sent in.
        answer: dict[str, Any] = {"adapter": adapter or None, "metrics": metrics}
        if kind == "stale-round":
            answer["round"] = int(request.get("round", 0)) - 1
        return answer


def hostile_record(kind: str, adapter: dict[str, np.ndarray], dtype: str) -> ArrayRecord:
    """The record a RECORD_KINDS ClientApp sends in place of `to_record(adapter, dtype)`: the
    honest layout with values the server must refuse."""
    honest = to_record(adapter, dtype)
    if dtype == "float32":  # the initial adapter (query): answered honestly
        return honest
    values = np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in adapter.values()])
    if kind == "float64":
        data, wire = values.astype(np.float64).tobytes(), "float64"
    elif kind == "int8":
        data, wire = np.clip(np.round(values * 100), -128, 127).astype(np.int8).tobytes(), "int8"
    elif kind == "oversized":
        data, wire = honest[TENSORS].data + bytes(OVERSIZED_EXTRA_BYTES), dtype
    elif kind == "scaled-1e6":
        # float32, which the server accepts whatever the run's transport dtype: float16 would
        # overflow.
        data, wire = (values * np.float32(1e6)).astype(np.float32).tobytes(), "float32"
    else:
        raise ValueError(f"{kind!r} is not one of {RECORD_KINDS}")
    itemsize = np.dtype(wire).itemsize
    return ArrayRecord({
        LAYOUT: honest[LAYOUT],
        TENSORS: Array(dtype=wire, shape=(len(data) // itemsize,), stype=PACKED_STYPE, data=data),
    })


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", type=parse_kinds, required=True,
                        help="a kind, or kinds by round: nan,inf")
    parser.add_argument("--site", required=True)
    parser.add_argument("--server", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--work-dir", required=True)
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    socket_path = trainer_socket_path(work, args.site)
    server = TrainerServer(HostileTrainer(args.kind, args.site), socket_path)  # type: ignore[arg-type]
    record_kind = args.kind[0] if args.kind[0] in RECORD_KINDS else None
    server.start()
    env = supernode_env(work)
    if record_kind:
        # The SuperNode's ClientApp processes inherit this environment. Each is a fresh
        # `flwr-clientapp` interpreter, which sitecustomize recognises: a ClientApp forked
        # from the warm one (the default) starts no interpreter and imports nothing anew.
        here = Path(__file__).parent
        env[HOSTILE_RECORD_ENV] = record_kind
        env[WARM_ENV] = "0"
        env["PYTHONPATH"] = os.pathsep.join(
            [str(here / "hostile_record"), str(here), env.get("PYTHONPATH", "")])
    # The SuperNode a real site runs (`pollinate-client join`'s), with its hostile trainer.
    host, port = parse_server(args.server)
    site = argparse.Namespace(site=args.site, max_retries=10, insecure=False, key=args.key)
    return subprocess.call(supernode_command(site, host, port, Path(args.ca), socket_path), env=env)


if __name__ == "__main__":
    sys.exit(main())
