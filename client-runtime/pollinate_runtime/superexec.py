"""Flower's SuperExec with warm ClientApp processes: `python -m pollinate_runtime.superexec
<flower-superexec flags>` is `flower-superexec`, except that each `flwr-clientapp` it launches
is forked from a process that has already imported Flower and Pollinate's ClientApp.

Flower 1.41 starts a new `flwr-clientapp` process for every message (SubprocessExecutor runs
the command by name) and nothing in it is settable. Starting Python and importing
`flwr.supernode.runtime.run_clientapp` takes 1-1.6 s on the machines measured here
(flower-1.41-probe.md), every round and at every site, before the message is even read. A
fork of a warm interpreter starts in milliseconds.

The warm process is multiprocessing's fork server: a fresh interpreter (started before the
first message, so the first round gains too) that imports `WARM_MODULES` and nothing else,
holds no threads and no connections, and forks once per message. The child then runs
Flower's own `flwr-clientapp` entry point with the arguments Flower built, so the protocol,
the token and the exit status are Flower's. It is the default; `POLLINATE_WARM_CLIENTAPP=0`
gives each message a fresh process, as under stock Flower.

Flower's SuperExec asks the SuperNode for a task every FLWR_SUPEREXEC_TASK_POLL_INTERVAL
(0.25 s here: a message waits 0.125 s on average). A SuperExec that has launched nothing for
`IDLE_AFTER_SECONDS` (between runs, as the SuperNode's own backoff) asks every
`IDLE_POLL_SECONDS` instead: an idle site's SuperExec otherwise spends 0.7% of a core on it.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

WARM_ENV = "POLLINATE_WARM_CLIENTAPP"
CLIENTAPP_COMMAND = "flwr-clientapp"
SUPEREXEC_COMMAND = "flower-superexec"
# What a ClientApp process imports before it reads its message: Flower's entry point and
# Pollinate's ClientApp (flwr and numpy only; torch stays in the site trainer).
WARM_MODULES = ("flwr.supernode.cli.flwr_clientapp", "pollinate_runtime.client_app")

IDLE_AFTER_SECONDS = 60.0
IDLE_POLL_SECONDS = 2.0

Launch = Callable[[list[str], dict[str, Any]], Any]


class Rerouted:
    """A stand-in for a module's `subprocess`: `Popen` of one command goes to `launch`; any
    other command, and every other attribute, is the real module's."""

    def __init__(self, command: str, launch: Launch) -> None:
        self.command = command
        self.launch = launch

    def Popen(self, args: Sequence[str], **kwargs: Any) -> Any:  # subprocess.Popen's name
        args = list(args)
        if args and args[0] == self.command:
            return self.launch(args, kwargs)
        return subprocess.Popen(args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


def warm_enabled(env: dict[str, str] | os._Environ[str]) -> bool:
    raw = env.get(WARM_ENV, "1").strip().lower()
    if raw in ("1", "true", "yes", "on", ""):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{WARM_ENV}={raw!r}: expected 1 (fork from a warm process) or 0 "
                     "(a fresh process per message)")


def run_clientapp(args: list[str], quiet: bool) -> None:
    """The forked child: Flower's `flwr-clientapp` entry point with Flower's arguments."""
    if quiet:  # what SubprocessExecutor's stdout/stderr=DEVNULL asks for
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    from flwr.supernode.cli import flwr_clientapp

    sys.argv = [CLIENTAPP_COMMAND, *args[1:]]
    flwr_clientapp()


class WarmLauncher:
    """Launches `flwr-clientapp` as a fork of the warm fork server."""

    def __init__(self, modules: Sequence[str] = WARM_MODULES) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(list(modules))
        self.last_launch = time.monotonic()  # a site that just joined is about to get work
        self._process: Any = None

    def last_active(self) -> float:
        """When a ClientApp was last launched or seen running: a round that trains for minutes
        keeps its site's polls fast, for the next round's message right after it."""
        if self._process is not None and self._process.is_alive():
            self.last_launch = time.monotonic()
        return self.last_launch

    def start(self) -> None:
        """Start the fork server now, so the first message does not wait for its imports."""
        from multiprocessing import forkserver

        forkserver.ensure_running()

    def __call__(self, args: list[str], kwargs: dict[str, Any]) -> Any:
        self.last_launch = time.monotonic()
        quiet = kwargs.get("stdout") is subprocess.DEVNULL
        process = self.context.Process(target=run_clientapp, args=(args, quiet), name=CLIENTAPP_COMMAND)
        process.start()
        self._process = process
        return process


class PacedPolls:
    """The `time` module of Flower's SuperExec loop, whose one sleep is its task poll: the
    poll's own interval while tasks come, `IDLE_POLL_SECONDS` once none has for a while."""

    def __init__(self, last_active: Callable[[], float], clock: Callable[[], float] = time.monotonic) -> None:
        self.last_active = last_active
        self.clock = clock

    def sleep(self, seconds: float) -> None:
        if self.clock() - self.last_active() > IDLE_AFTER_SECONDS:
            seconds = max(seconds, IDLE_POLL_SECONDS)
        time.sleep(seconds)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def pace(loop_module: ModuleType, launcher: WarmLauncher) -> None:
    """Slow the loop module's task polls down while `launcher` has launched nothing."""
    if getattr(loop_module, "time", None) is not time:
        raise RuntimeError(f"{loop_module.__name__} no longer sleeps through the time module; "
                           "check the pinned flwr version")
    loop_module.time = PacedPolls(launcher.last_active)  # type: ignore[attr-defined]


def superexec_command(args: Sequence[str]) -> list[str]:
    """This module's command line for the `flower-superexec` command line `args`."""
    return [sys.executable, "-m", "pollinate_runtime.superexec", *list(args)[1:]]


def prepare(executor_module: ModuleType, env: dict[str, str] | os._Environ[str]) -> WarmLauncher | None:
    """Route the executor module's `flwr-clientapp` launches to a started warm launcher, unless
    `env` turns it off."""
    if not warm_enabled(env):
        return None
    if getattr(executor_module, "subprocess", None) is not subprocess:
        raise RuntimeError(f"{executor_module.__name__} no longer launches through the subprocess "
                           "module; check the pinned flwr version")
    launcher = WarmLauncher()
    launcher.start()
    executor_module.subprocess = Rerouted(CLIENTAPP_COMMAND, launcher)  # type: ignore[attr-defined]
    return launcher


def main() -> None:
    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.superexec import run_superexec
    from flwr.supercore.superexec.executor import subprocess_executor

    try:
        launcher = prepare(subprocess_executor, os.environ)
        if launcher is not None:
            pace(run_superexec, launcher)
    except (ValueError, RuntimeError) as err:
        sys.exit(f"pollinate superexec: {err}")
    sys.argv[0] = SUPEREXEC_COMMAND
    flower_superexec()


if __name__ == "__main__":
    main()
