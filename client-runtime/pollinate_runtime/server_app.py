"""Pollinate's Flower ServerApp: a thin entry point around `rounds.FederatedRun`."""

from __future__ import annotations

import logging
import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .rounds import FederatedRun
from .run_config import RunConfig
from .store import FederationStore

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Flower forwards every log line of a ServerApp to the SuperLink as a request of its own:
    # a line per HTTP call would be a fifth to a third of all the app's requests
    # (bench/round_overhead.py). POLLINATE_LOG_HTTP=1 keeps them for debugging.
    if os.environ.get("POLLINATE_LOG_HTTP") != "1":
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
    # Flower captures a ServerApp's output into its own log stream; a file beside it survives
    # a crashed or killed server for whoever investigates.
    if path := os.environ.get("POLLINATE_SERVER_LOG"):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
    config = RunConfig.from_flower(dict(context.run_config))
    store = FederationStore.connect(
        config.s3_bucket, config.s3_root,
        endpoint_url=config.s3_endpoint or os.environ.get("POLLINATE_S3_ENDPOINT") or None,
        region=config.s3_region)
    FederatedRun(grid, config, store).run()
