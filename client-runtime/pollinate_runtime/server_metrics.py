"""The Flower server's Prometheus metrics, and the endpoint that serves them.

Every refusal the server makes is counted here: a request its gate refused (`server_gate`)
and a site reply its round loop refused (`rounds`: an update or an evaluation, with the
site). The gate runs in the SuperLink's process and the round loop in each run's ServerApp
process, so when the pod sets `PROMETHEUS_MULTIPROC_DIR` the counters live in
prometheus_client's per-process files there and the SuperLink serves their sum. It serves
them on a port of its own (`POLLINATE_METRICS_ADDRESS`, host:port), plain HTTP as Prometheus
scrapes: Flower's port is the sites' and the Ingress's, this one is only the scraper's (the
server's NetworkPolicy admits the scraper the hub chart names, and nobody by default).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, start_http_server

log = logging.getLogger(__name__)

ADDRESS_ENV = "POLLINATE_METRICS_ADDRESS"
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

REFUSED_REQUESTS = Counter(
    "pollinate_server_refused_requests", "Requests the server's gate refused, by API and reason",
    ["api", "reason"],
)
# Site names are few (a federation's members) and are what an operator acts on.
REJECTED_REPLIES = Counter(
    "pollinate_server_rejected_replies",
    "Site replies the round loop refused (an update or an evaluation), by reason and site",
    ["reason", "site"],
)
CAPPED_EXAMPLE_COUNTS = Counter(
    "pollinate_server_capped_example_counts",
    "Updates whose example count was counted as the run's maxExamplesPerSite, by site",
    ["site"],
)


# Without the operator's site list a site's name is the one it reports itself: bounded, so a
# hostile site cannot fill the scraper with long label values.
SITE_LABEL_MAX = 63


def count_rejection(reason: str, site: str) -> None:
    REJECTED_REPLIES.labels(str(reason), site[:SITE_LABEL_MAX]).inc()


def parse_address(text: str) -> tuple[str, int]:
    """`host:port` (host may be empty: every address; port 0: any free one) -> (host, port);
    the error names the variable and what was expected."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{ADDRESS_ENV}={text!r}: expected host:port, for example 0.0.0.0:9190")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(env: Mapping[str, str]) -> tuple[str, int] | None:
    """Serve /metrics at $POLLINATE_METRICS_ADDRESS, if set, from a thread of this process.

    With $PROMETHEUS_MULTIPROC_DIR set (the server pod sets it), the files there of processes
    that ran before this one (a restarted container keeps /tmp) are removed first: their
    counts belong to a server that is gone, as a restarted process's counters would."""
    registry: CollectorRegistry = REGISTRY
    if folder := env.get(MULTIPROCESS_DIR_ENV, "").strip():
        # Made here even when nothing is served: every process's first count writes a file in it.
        path = Path(folder)
        for stale in path.glob("*.db") if path.is_dir() else ():
            stale.unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
    text = env.get(ADDRESS_ENV, "").strip()
    if not text:
        return None
    host, port = parse_address(text)
    if folder:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
    server, _ = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[:2]
    log.info("serving metrics at http://%s:%d/metrics", bound[0], bound[1])
    return str(bound[0]), int(bound[1])

