"""The server's metrics endpoint over HTTP on loopback (pollinate_runtime.server_metrics.serve),
in this process: what a scraper reads."""

from __future__ import annotations

import urllib.request

from pollinate_runtime import server_metrics
from pollinate_runtime.server_metrics import ADDRESS_ENV


def test_the_refusal_counters_are_served_at_the_address() -> None:
    server_metrics.count_rejection("InvalidMetric", "site-z")
    host, port = server_metrics.serve({ADDRESS_ENV: "127.0.0.1:0"})
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'pollinate_server_rejected_replies_total{reason="InvalidMetric",site="site-z"}' in text
    assert "# TYPE pollinate_server_refused_requests_total counter" in text
