"""The sites of the round-overhead benchmark, as code that runs inside a site's own processes.

    python bench/round_sites.py join ...   # `pollinate-client join`, each trainer request timed
    round_sites:stock_app                  # a ClientApp that loads the model for every message

Both are Pollinate's own code, unchanged, with a stopwatch around it: the first wraps
`SiteTrainer.handle` (the resident trainer's whole work for one message: evaluating the
global adapter, training, extracting the new one); the second is Pollinate's ClientApp with
the site trainer moved into the ClientApp process, built afresh for every message, which is
what a ClientApp that trains by itself costs under stock Flower 1.41 (a new process per
message). Each message leaves one JSON line in the file $POLLINATE_BENCH_TIMINGS names.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

TIMINGS_ENV = "POLLINATE_BENCH_TIMINGS"  # this site's JSON-lines file
SITE_ENV = "POLLINATE_BENCH_SITE"        # the site's name and data, for the stock ClientApp
DATA_ENV = "POLLINATE_BENCH_SITE_DATA"


def record(entry: dict[str, Any]) -> None:
    with open(os.environ[TIMINGS_ENV], "a") as timings:
        timings.write(json.dumps(entry) + "\n")


def _metrics(answer: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in answer.get("metrics", {}).items()}


# ---- model resident: `pollinate-client join` with the trainer timed --------------------------


def timed_join(argv: list[str]) -> int:
    from pollinate_runtime import cli
    from pollinate_runtime.site_trainer import SiteTrainer

    handle = SiteTrainer.handle

    def timed(self: SiteTrainer, request: dict[str, Any]) -> dict[str, Any]:
        start_wall, start = time.time(), time.perf_counter()
        answer = handle(self, request)
        record({"mode": "resident", "site": self.options.site, "kind": request["kind"],
                "round": int(request.get("round", 0)), "start": start_wall, "end": time.time(),
                "compute_seconds": time.perf_counter() - start, "metrics": _metrics(answer)})
        return answer

    SiteTrainer.handle = timed  # type: ignore[method-assign]
    return cli.main(argv)


# ---- fresh process per message: the trainer inside the ClientApp ------------------------------


def _in_process_trainer(_socket_path: str, request: dict[str, Any]) -> dict[str, Any]:
    """What `call_trainer` does over the socket, done here in a fresh process: import torch,
    transformers and peft, load the model and the site's data, then serve the request."""
    import psutil

    entered = time.time()
    process_started = psutil.Process().create_time()
    start = time.perf_counter()
    import peft  # noqa: F401 - what a ClientApp that trains must import for itself
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from pollinate_runtime.run_config import RunConfig
    from pollinate_runtime.site_trainer import SiteOptions, SiteTrainer

    imported = time.perf_counter()
    trainer = SiteTrainer(SiteOptions(site=os.environ[SITE_ENV], data=Path(os.environ[DATA_ENV]),
                                      device="cpu"))
    config = RunConfig.from_flower(request["config"])
    # The trainer's own loading steps, called first so that loading is timed apart from
    # the work the resident trainer also does (handle() finds both done and goes on).
    trainer._ensure_model(config)
    if request["kind"] != "init":
        trainer._ensure_data(config)
    loaded = time.perf_counter()
    answer = trainer.handle(request)
    done = time.perf_counter()
    record({"mode": "stock", "site": os.environ[SITE_ENV], "kind": request["kind"],
            "round": int(request.get("round", 0)),
            "process_start": process_started, "entered": entered,
            "start": entered + (loaded - start), "end": entered + (done - start),
            "import_seconds": imported - start, "load_seconds": loaded - imported,
            "compute_seconds": done - loaded, "metrics": _metrics(answer)})
    return {"ok": True, **answer}


def _stock_app():
    from pollinate_runtime import client_app

    # The ClientApp's handlers look call_trainer up when they run: this process serves the
    # request itself instead of forwarding it to the resident trainer.
    client_app.call_trainer = _in_process_trainer
    return client_app.app


def __getattr__(name: str) -> Any:
    # `round_sites:stock_app` is built only when Flower asks for it: importing this module
    # for its constants changes nothing.
    if name == "stock_app":
        return _stock_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(timed_join(sys.argv[1:]))
