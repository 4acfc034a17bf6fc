"""Bytes on the wire: what one site sends and receives per round through Flower 1.41's Fleet API,
for a SmolLM2-135M LoRA adapter on q_proj and v_proj (r=8 and r=16), against the adapter's
parameters x 2 bytes (fp16), fp32 transport, and the full base model.

    python bench/wire_bytes.py            # (--quick is the same: a few seconds)
    python bench/wire_bytes.py --tiny     # a toy model, for tests

The messages are Pollinate's own (the server's `train` instruction and the site's reply, built
as rounds.py and client_app.py build them, arrays encoded by wire.to_record) and they travel
through Flower's own SuperLink app and Fleet client; fleet_wire.py says what is counted.
Target (issue 6): within 1% of parameters x 2 bytes for fp16.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from common import Headline, load_average, parse_mode, print_notes, print_table, write_result
from fleet_wire import FleetLink, Tally, arrays_equal
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from pollinate_runtime import messages as m
from pollinate_runtime.wire import LAYOUT, TENSORS, from_record, to_record

NAME = "wire_bytes"
OVERHEAD_TARGET = 0.01
SUPERNODE_IDLE_PULL_SECONDS = 3.0  # start_client_internal sleeps 3 s after an empty pull
HEARTBEAT_SECONDS = 24.0           # 30 s interval x HEARTBEAT_BASE_MULTIPLIER 0.8


@dataclass(frozen=True)
class BaseModel:
    """The shapes LoRA on q_proj/v_proj sees, without loading the model."""

    name: str
    layers: int
    hidden: int
    kv_dim: int  # v_proj's output: num_key_value_heads x head_dim
    params: int  # the whole base model

    def lora_shapes(self, rank: int) -> dict[str, tuple[int, int]]:
        outputs = {"q_proj": self.hidden, "v_proj": self.kv_dim}
        shapes = {}
        for layer in range(self.layers):
            for module, out in outputs.items():
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                shapes[f"{prefix}.lora_A.weight"] = (rank, self.hidden)
                shapes[f"{prefix}.lora_B.weight"] = (out, rank)
        return shapes


# SmolLM2-135M: 30 layers, hidden 576, 9 query and 3 key/value heads of 64.
SMOLLM2 = BaseModel("SmolLM2-135M", layers=30, hidden=576, kv_dim=192, params=134_515_008)
TOY = BaseModel("toy", layers=2, hidden=64, kv_dim=32, params=1_000_000)
PLANS = {"tiny": (TOY, (2,)), "quick": (SMOLLM2, (8, 16)), "full": (SMOLLM2, (8, 16))}


def trained_adapter(shapes: dict[str, tuple[int, int]], seed: int,
                    fresh: bool = False) -> dict[str, np.ndarray]:
    """An adapter after some training: every value differs, so Flower can deduplicate nothing.
    `fresh`: as PEFT initialises it (lora_B zero), what round 1 sends."""
    rng = np.random.default_rng(seed)
    return {name: (np.zeros(shape, np.float32) if fresh and ".lora_B." in name
                   else rng.normal(0, 0.02, shape).astype(np.float32))
            for name, shape in shapes.items()}


# ---- encodings ------------------------------------------------------------------------------


def pollinate(adapter: dict[str, np.ndarray], dtype: str) -> dict[str, Any]:
    """Pollinate's format (wire.to_record): every tensor in one Array, names and shapes in a
    small compressed layout Array."""
    return {m.ARRAYS: to_record(adapter, dtype)}


def per_tensor(adapter: dict[str, np.ndarray], dtype: str) -> dict[str, Any]:
    """Flower's usual ArrayRecord, the peer: one Array per tensor (np.save'd, float16/32 only),
    so Flower sends 2 objects per tensor (an Array and its chunk), each its own HTTP request."""
    return {m.ARRAYS: ArrayRecord({n: Array(np.asarray(v, dtype=dtype)) for n, v in adapter.items()})}


def unpack(content: RecordDict) -> dict[str, np.ndarray]:
    record = content.array_records[m.ARRAYS]
    if set(record.keys()) == {LAYOUT, TENSORS}:
        return from_record(record)
    return {n: a.numpy() for n, a in record.items()}


# ---- one round ------------------------------------------------------------------------------


def site_metrics(rank: int) -> MetricRecord:
    """What a site reports with its update (client_app.py: the trainer's metrics as floats)."""
    return MetricRecord({m.NUM_EXAMPLES: 512.0, m.TRAIN_LOSS: 2.31, m.EVAL_LOSS: 2.45,
                         m.EVAL_EXAMPLES: 64.0, m.GENERAL_LOSS: 2.9, m.ADAPTER_NORM: 1.7,
                         m.TRAIN_SECONDS: 61.2, m.LOAD_SECONDS: 0.4, m.EVAL_SECONDS: 3.1,
                         m.SITE_RANK: float(rank)})


def one_round(link: FleetLink, round_: int, rank: int, shapes: dict[str, tuple[int, int]],
              dtype: str, encode: Any, fresh: bool) -> dict[str, Any]:
    """The server sends the global adapter, the site replies with its own; both checked to
    arrive intact. Returns the site's tallies and Flower's own traffic counter for each way.
    Every round's adapters are new values, as after training: nothing is already on the other
    side for Flower to skip."""
    global_adapter = trained_adapter(shapes, seed=2 * round_, fresh=fresh)
    site_adapter = trained_adapter(shapes, seed=2 * round_ + 1)
    sent_down = encode(global_adapter, dtype)
    instruction = link.server_sends(
        RecordDict({**sent_down, m.CONFIG: ConfigRecord({m.ROUND: round_})}), "train", str(round_))
    counter = link.traffic()
    received = link.site_receives()
    down = link.transport.take()
    counter_down = link.traffic()
    assert arrays_equal(unpack(received.content), unpack(RecordDict(sent_down))), "down: corrupted"

    sent_up = encode(site_adapter, dtype)
    reply = Message(RecordDict({m.CONFIG: ConfigRecord({m.ROUND: round_, m.SITE: "hospital-a"}),
                                m.METRICS: site_metrics(rank), **sent_up}), reply_to=received)
    link.site_replies(reply)
    up = link.transport.take()
    counter_up = link.traffic()
    got = link.server_receives(instruction)
    assert arrays_equal(unpack(got.content), unpack(RecordDict(sent_up))), "up: corrupted"
    return {"down": down, "up": up, "up_payload": _payload(sent_up),
            "flower_counter_down": counter_down[0] - counter[0],
            "flower_counter_up": counter_up[1] - counter_down[1]}


def _payload(records: dict[str, Any]) -> int:
    """Bytes of array data in the records (values, plus the layout or each Array's npy header)."""
    return sum(len(a.data) for r in records.values() if isinstance(r, ArrayRecord) for a in r.values())


PEER = "float16, one Array per tensor (Flower's usual record)"
VARIANTS = (
    # (label, transport dtype, encoding, round-1 adapter)
    ("float16", "float16", pollinate, False),
    ("bfloat16", "bfloat16", pollinate, False),
    ("float32", "float32", pollinate, False),
    (PEER, "float16", per_tensor, False),
)
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


def measure(model: BaseModel, ranks: tuple[int, ...]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    link = FleetLink()
    rows = []
    for rank in ranks:
        shapes = model.lora_shapes(rank)
        params = sum(math.prod(s) for s in shapes.values())
        for label, dtype, encode, fresh in VARIANTS:
            r = one_round(link, len(rows) + 1, rank, shapes, dtype, encode, fresh)
            down, up = r["down"], r["up"]
            # The site sends every request of the round (its pulls too) and receives every response.
            sent, received = down.sent + up.sent, down.received + up.received
            fp16_bytes = params * 2
            rows.append({
                "model": model.name, "rank": rank, "tensors": len(shapes), "params": params,
                "variant": label, "dtype": dtype,
                "params_x_2_bytes": fp16_bytes, "params_x_dtype_bytes": params * ITEMSIZE[dtype],
                "received_bytes": received, "sent_bytes": sent,
                "download": {"requests": down.requests, "sent": down.sent, "received": down.received,
                             "protobuf_received": down.protobuf_received},
                "upload": {"requests": up.requests, "sent": up.sent, "received": up.received,
                           "protobuf_sent": up.protobuf_sent},
                "flower_counter_down": r["flower_counter_down"],
                "flower_counter_up": r["flower_counter_up"],
                # Where the site's update grows on its way up, in bytes the site sends.
                "upload_breakdown": {
                    "values": params * ITEMSIZE[dtype],
                    "layout_or_array_headers": r["up_payload"] - params * ITEMSIZE[dtype],
                    "flower_objects_and_protobuf": up.protobuf_sent - r["up_payload"],
                    "http_request_heads": up.sent - up.protobuf_sent,
                },
                "received_overhead": received / fp16_bytes - 1,
                "sent_overhead": sent / fp16_bytes - 1,
                "fraction_of_base_model": sent / (model.params * 2),
            })
    pull, heartbeat = link.site_idles()
    idle = {
        "empty_pull_bytes": pull.sent + pull.received,
        "heartbeat_bytes": heartbeat.sent + heartbeat.received,
        "bytes_per_idle_minute": round(60 / SUPERNODE_IDLE_PULL_SECONDS * (pull.sent + pull.received)
                                       + 60 / HEARTBEAT_SECONDS * (heartbeat.sent + heartbeat.received)),
        "http_request_head_bytes": _typical_head(pull),
    }
    return rows, idle


def _typical_head(tally: Tally) -> int:
    return tally.exchanges[0].request_head if tally.exchanges else 0


# ---- report ---------------------------------------------------------------------------------


def headlines(rows: list[dict[str, Any]], model: BaseModel) -> list[Headline]:
    out = []
    for r in rows:
        case = f"{model.name} r={r['rank']} ({r['params']:,} params), {r['variant']}"
        worst = max(r["received_overhead"], r["sent_overhead"])
        measured = f"received {r['received_bytes']:,} B, sent {r['sent_bytes']:,} B"
        if r["variant"] == "float16":
            out.append(Headline(NAME, case, measured, f"params x 2 = {r['params_x_2_bytes']:,} B",
                                f"+{r['received_overhead']:.1%} / +{r['sent_overhead']:.1%}",
                                f"<= +{OVERHEAD_TARGET:.0%}", worst <= OVERHEAD_TARGET))
            out.append(Headline(NAME, f"{model.name} r={r['rank']}, float16 vs the full base model",
                                f"sent {r['sent_bytes']:,} B",
                                f"{model.params:,} params x 2 = {model.params * 2:,} B",
                                f"{r['fraction_of_base_model']:.2%}", "-", None))
        elif r["variant"] in ("float32", PEER):
            out.append(Headline(NAME, case, measured, f"params x 2 = {r['params_x_2_bytes']:,} B",
                                f"+{r['received_overhead']:.1%} / +{r['sent_overhead']:.1%}",
                                "-", None))
    return out


def notes(rows: list[dict[str, Any]], idle: dict[str, Any]) -> list[str]:
    fp16 = [r for r in rows if r["variant"] == "float16"]
    out = []
    for r in fp16:
        requests = r["download"]["requests"] + r["upload"]["requests"]
        extra = r["sent_bytes"] + r["received_bytes"] - 2 * r["params_x_2_bytes"]
        out.append(
            f"r={r['rank']} float16: {requests} HTTP requests per round ({r['download']['requests']} "
            f"to pull, {r['upload']['requests']} to push): Flower sends each object of the message "
            f"tree in a request of its own; Pollinate's adapter is two Arrays whatever its "
            f"{r['tensors']} tensors. The {extra:,} bytes beyond the two adapters are "
            f"{extra / requests:,.0f} per request: about {idle['http_request_head_bytes']} bytes "
            "of request head (the ECDSA signature, public key and timestamp on every Fleet call), "
            "the response head, the protobuf wrapper, and the compressed layout. "
            f"Flower's own traffic counter (object contents and message protobufs only) says "
            f"{r['flower_counter_down']:,} down and {r['flower_counter_up']:,} up. The upload: "
            + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in r["upload_breakdown"].items())
            + ".")
    out.append(f"idle site: {idle['empty_pull_bytes']:,} bytes per empty pull (every "
               f"{SUPERNODE_IDLE_PULL_SECONDS:.0f} s) and {idle['heartbeat_bytes']:,} per heartbeat: "
               f"{idle['bytes_per_idle_minute']:,} bytes per idle minute.")
    out.append("Not counted: TLS (about 22 bytes per 16 KiB record, plus one handshake per "
               "connection) and TCP/IP headers below HTTP.")
    return out


def report(rows: list[dict[str, Any]], heads: list[Headline], notes_: list[str]) -> None:
    print_table(
        "bytes per site per round (HTTP/1.1 request and response heads and bodies)",
        ["case", "params", "params x 2", "received", "sent", "+% recv", "+% sent",
         "requests dn/up", "adapter dn/up (protobuf)", "Flower counter dn/up", "of base model"],
        [[f"r={r['rank']} {r['variant']}", r["params"], r["params_x_2_bytes"], r["received_bytes"],
          r["sent_bytes"], f"{r['received_overhead']:+.1%}", f"{r['sent_overhead']:+.1%}",
          f"{r['download']['requests']}/{r['upload']['requests']}",
          f"{r['download']['protobuf_received']:,}/{r['upload']['protobuf_sent']:,}",
          f"{r['flower_counter_down']:,}/{r['flower_counter_up']:,}",
          f"{r['fraction_of_base_model']:.2%}"] for r in rows])
    print_table("wire bytes: targets", ["case", "measured", "against", "ratio", "target", "verdict"],
                [[h.case, h.measured, h.against, h.ratio, h.target, h.verdict] for h in heads])
    print_notes(notes_)



def judge(result: dict[str, Any]) -> list[Headline]:
    """The headlines of a stored result, judged by this code (run.py --from-results)."""
    shape = {f.name: result["model"][f.name] for f in fields(BaseModel)}
    return headlines(result["rounds"], BaseModel(**shape))

def run(mode: str, results_dir: Path) -> dict[str, Any]:
    started, load_before = time.monotonic(), load_average()
    model, ranks = PLANS[mode]
    rows, idle = measure(model, ranks)
    heads = headlines(rows, model)
    notes_ = notes(rows, idle)
    report(rows, heads, notes_)
    return write_result(NAME, mode, {
        "model": {"name": model.name, "layers": model.layers, "hidden": model.hidden,
                  "kv_dim": model.kv_dim, "params": model.params,
                  "target_modules": ["q_proj", "v_proj"]},
        "method": "Flower's SuperLink app (create_app) and FleetHttpClient with the SuperNode's "
                  "interceptors, in one process; HTTP/1.1 heads and bodies counted, uvicorn's "
                  "date/server headers added; TLS and TCP/IP not counted",
        "target": {"overhead_vs_params_x_2": OVERHEAD_TARGET},
        "rounds": rows,
        "idle": idle,
        "headlines": heads,
        "notes": notes_,
    }, results_dir, started=started, load_before=load_before)


def main(argv: list[str] | None = None) -> None:
    args = parse_mode(__doc__.splitlines()[0], argv)
    run(args.mode, args.results_dir)


if __name__ == "__main__":
    main()
