"""`pollinate-operator`: run the operator (in a pod, or locally against any kubeconfig)."""

from __future__ import annotations

import argparse
import os
import sys

from . import logs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pollinate-operator", description=__doc__)
    parser.add_argument("--namespace", "-n", action="append", default=[],
                        help="watch only these namespaces (default: all)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8081/healthz",
                        help="liveness endpoint kopf serves (empty to disable)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logs.configure(args.verbose)
    if args.namespace:  # read by Settings when the handlers module loads
        os.environ["POLLINATE_WATCH_NAMESPACES"] = ",".join(args.namespace)
    import kopf

    from . import handlers  # noqa: F401 - registers the handlers

    kopf.run(
        clusterwide=not args.namespace, namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
