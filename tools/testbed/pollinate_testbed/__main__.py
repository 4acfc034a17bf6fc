"""`pollinate-testbed up|down|status|env|build`: the local cluster from a shell."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .cluster import Testbed, TestbedError, build_binaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pollinate-testbed", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "env", "build"])
    parser.add_argument("--state-dir", default=None, help="default: $POLLINATE_TESTBED_DIR or ./.testbed")
    parser.add_argument("--execute", action="store_true", default=None,
                        help="up: really run pods (node agent) instead of simulating them (kwok); "
                             "also $POLLINATE_TESTBED_EXECUTE=1")
    args = parser.parse_args(argv)
    testbed = Testbed(state_dir=Path(args.state_dir) if args.state_dir else None)
    try:
        if args.command == "build":
            print(build_binaries())
        elif args.command == "up":
            testbed.up(execute=args.execute)
            print(f"export KUBECONFIG={testbed.kubeconfig}")
            print(f"# kubectl, helm and the other binaries: {testbed.bin_dir}")
        elif args.command == "down":
            testbed.down()
        elif args.command == "status":
            running = testbed.is_running()
            print("running" if running else "stopped")
            return 0 if running else 1
        elif args.command == "env":
            if not testbed.is_running():
                print("testbed is not running; start it with `make up`", file=sys.stderr)
                return 1
            for key, value in testbed.env().items():
                print(f"export {key}={shlex.quote(value)}")
    except TestbedError as err:
        print(f"pollinate-testbed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
