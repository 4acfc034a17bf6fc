"""`pollinate-operator`: run the operator (in a pod, or locally against any kubeconfig)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from collections.abc import Iterator

from . import logs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pollinate-operator", description=__doc__)
    parser.add_argument("--namespace", "-n", action="append", default=[],
                        help="watch only these namespaces (default: all)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8081/healthz",
                        help="liveness endpoint kopf serves (empty to disable)")
    parser.add_argument("--leader-elect", action="store_true",
                        help="reconcile only while holding the Lease pollinate-operator (several "
                             "replicas: one leads, the others stand by)")
    parser.add_argument("--leader-elect-namespace",
                        default=os.environ.get("POLLINATE_OPERATOR_NAMESPACE", "default"),
                        help="the Lease's namespace (default: $POLLINATE_OPERATOR_NAMESPACE)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logs.configure(args.verbose)
    if args.namespace:  # read by Settings when the handlers module loads
        os.environ["POLLINATE_WATCH_NAMESPACES"] = ",".join(args.namespace)
    import kopf

    from . import handlers  # noqa: F401 - registers the handlers

    election = None
    stop = threading.Event()
    if args.leader_elect:
        from . import leader

        election = leader.LeaderElection(args.leader_elect_namespace,
                                         leader.identity(os.environ.get("HOSTNAME", "")))
        # A standby is healthy: its liveness endpoint answers while it waits.
        with standby_health(args.liveness):
            leader.install_stop_signals(stop)
            if not election.acquire(stop):
                return 0
        election.keep(on_lost=stop.set)
    try:
        kopf.run(
            clusterwide=not args.namespace, namespaces=args.namespace,
            liveness_endpoint=args.liveness or None, stop_flag=stop if election else None,
        )
    finally:
        if election is not None:
            election.release()
    return 1 if election is not None and election.lost.is_set() else 0


@contextlib.contextmanager
def standby_health(endpoint: str) -> Iterator[None]:
    """Answer 200 at `endpoint`'s port while standing by (kopf serves it once leading)."""
    if not endpoint:
        yield
        return
    import http.server
    import urllib.parse

    url = urllib.parse.urlsplit(endpoint)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"standing by\n")

        def log_message(self, *args: object) -> None:
            pass

    http.server.ThreadingHTTPServer.allow_reuse_address = True
    server = http.server.ThreadingHTTPServer((url.hostname or "0.0.0.0", url.port or 80), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
