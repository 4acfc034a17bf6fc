"""Pollinate's Flower ClientApp: a thin process that forwards each message to the site trainer.

It imports flwr and numpy only, never torch: Flower starts one of these per message, and the
model stays resident in the trainer that `pollinate-client join` runs (see `site_trainer`).
The SuperNode tells it where the trainer listens and which site it is (`--node-config`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import messages as m
from .run_config import RunConfig
from .site_trainer import TrainerError, call_trainer
from .wire import from_record, to_record

app = ClientApp()


def _site(context: Context) -> tuple[str, str]:
    node = context.node_config
    return str(node.get("site", "unnamed")), str(node["trainer-socket"])


def _forward(kind: str, msg: Message, context: Context) -> Message:
    site, socket_path = _site(context)
    config = RunConfig.from_flower(dict(context.run_config))
    round_number = int(msg.content.config_records.get(m.CONFIG, ConfigRecord()).get(m.ROUND, 0))
    adapter = None
    if m.ARRAYS in msg.content.array_records:
        adapter = {k: np.asarray(v, dtype=np.float32)
                   for k, v in from_record(msg.content.array_records[m.ARRAYS]).items()}
    refused = msg.content.config_records.get(m.CONFIG, ConfigRecord()).get(m.REFUSED)
    try:
        answer = call_trainer(socket_path, {
            "kind": kind, "config": dict(context.run_config), "round": round_number, "adapter": adapter,
            **({"refused": str(refused)} if refused else {})})
    except TrainerError as err:
        # Flower's own error reply names neither the site nor the cause the server can show.
        return Message(RecordDict({m.CONFIG: ConfigRecord(
            {m.ROUND: round_number, m.SITE: site, m.ERROR: str(err)[:1000]})}), reply_to=msg)
    records: dict = {
        # The round the trainer's answer belongs to (a late answer may be for an older round).
        m.CONFIG: ConfigRecord({m.ROUND: int(answer.get("round", round_number)), m.SITE: site}),
        m.METRICS: MetricRecord({k: float(v) for k, v in answer["metrics"].items()}),
    }
    if answer.get("adapter") is not None:
        dtype = "float32" if kind == "init" else config.transport_dtype
        records[m.ARRAYS] = to_record(answer["adapter"], dtype)
    return Message(RecordDict(records), reply_to=msg)


@app.query()
def init(msg: Message, context: Context) -> Message:
    return _forward("init", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _forward("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _forward("evaluate", msg, context)

