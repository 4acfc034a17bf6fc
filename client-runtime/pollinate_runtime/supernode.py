"""Flower's SuperNode, paced for rounds: `python -m pollinate_runtime.supernode <flower-supernode
flags>` is `flower-supernode` with its fixed waits shortened.

Flower 1.41's SuperNode (flwr.supernode.start_client_internal) sleeps 3 s after every pull that
brings no message, and waits for the ClientApp's reply and its objects in 0.5 s sleeps; neither
has a setting. Between rounds every site is idle, so a round's message waits 1.5 s on average
(3 s at worst) before a site sees it, the sites start up to 3 s apart, and each reply waits up
to 0.5 s more: about 2 s of a round's fixed cost on three sites (bench/round_overhead.py).

Here an idle site pulls again after 0.1 s right after it has handled a message (rounds run
back to back: the next one usually arrives within a second of a site's reply), doubling the
wait after every empty pull up to `POLLINATE_SUPERNODE_POLL_SECONDS` (default 1 s). A site that
has had no message for `IDLE_AFTER_SECONDS` (a minute: between runs, not between rounds) backs
off further, to `IDLE_FACTOR` times that: each signed pull costs the server about 12 ms of CPU
(measured: three idle sites took 4% of a core of the SuperLink at one pull a second), so a
hundred sites idling at 1 s would keep more than a core busy answering them. The local reply
waits every 0.05 s (they poll this process's own state, not the network). Only the
module's `time` is replaced, so nothing else in Flower changes; `flwr` is pinned to 1.41, and
`tests/unit/runtime/test_supernode.py` fails if the waits this relies on move.

A ClientApp process claimed for a message has `CLAIM_START_SECONDS` to start, not Flower's
30 s (`patient_claims`). Flower hands the message to a new process when the first has not
called in by then; on a loaded machine (sixteen sites starting their ClientApps at once on
two cores, as in CI, or a laptop that is busy) starting Python and importing Flower can take
longer than that, and every retry adds a process that slows the next one: no ClientApp ever
runs and the site misses the round. Only the start is given longer: once running, a ClientApp
that stops sending heartbeats is given up on after Flower's 60 s, as before.

How often the SuperNode tells the server it is alive is `POLLINATE_HEARTBEAT_SECONDS`
(default Flower's 30 s; Flower accepts 10 to 1800). The server counts a site offline after two
intervals without one, and refuses the site's key while its last connection still counts as
online: a site that was killed and restarts waits out two intervals before it is let back in
(about a minute by default, 20 s at 10), and a round notices a vanished site as late.

A ClientApp task that ends as failed without replying gets Flower's "ClientApp stopped
responding" error as its reply (`answer_failed_clientapps`), as a ClientApp that stops sending
heartbeats already does: without it the SuperNode waits for that reply forever.

The loop pushes the reply to the message it pulled before it pulls another
(`reply_before_pulling_again`): Flower's waits for any reply, and one left over from an earlier
message would leave the site one reply behind for the rest of the run.

A site runs only Pollinate's own client app (`only_pollinate_apps`): a run whose app bundle
(FAB) is not Pollinate's (app_bundle.py: one per version, its hash computed here) gets an
error reply naming both hashes for each message, and its bundle is never stored, installed or
imported; the site stays connected for the next run. Flower 1.41 itself would install and
import whatever bundle a run carries.

The SuperExec the SuperNode starts is Pollinate's (superexec.py), which forks each ClientApp
process from a warm one (`POLLINATE_WARM_CLIENTAPP=0`: a fresh interpreter per message, as
Flower does).
"""

from __future__ import annotations

import atexit
import hashlib
import inspect
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from types import ModuleType
from typing import Any, NoReturn

from .superexec import SUPEREXEC_COMMAND, Rerouted, superexec_command, warm_enabled

POLL_ENV = "POLLINATE_SUPERNODE_POLL_SECONDS"
HEARTBEAT_ENV = "POLLINATE_HEARTBEAT_SECONDS"
# What Flower 1.41's SuperLink accepts (flwr.common.constant.HEARTBEAT_MIN/MAX_INTERVAL).
HEARTBEAT_RANGE = (10.0, 1800.0)
DEFAULT_POLL_SECONDS = 1.0
LOCAL_WAIT_SECONDS = 0.05
FIRST_POLL_SECONDS = 0.1
CLAIM_START_SECONDS = 120.0
IDLE_AFTER_SECONDS = 60.0
IDLE_FACTOR = 4
# The sleeps of Flower 1.41's SuperNode loop this pacing replaces.
IDLE_PULL_SLEEP = 3
LOCAL_WAIT_SLEEP = 0.5


class PacedTime:
    """The `time` module with the SuperNode's two fixed waits replaced; every other attribute,
    and any other sleep, is the real module's."""

    def __init__(self, poll_seconds: float, local_wait_seconds: float = LOCAL_WAIT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not poll_seconds > 0:
            raise ValueError(f"{POLL_ENV}={poll_seconds!r}: expected a number of seconds > 0")
        self.poll_seconds = poll_seconds
        self.local_wait_seconds = local_wait_seconds
        self.next_poll = poll_seconds
        self.clock = clock
        self.last_message = clock()  # a site that just joined is about to get work

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_PULL_SLEEP:
            seconds = self.next_poll
            idle = self.clock() - self.last_message > IDLE_AFTER_SECONDS
            self.next_poll = min(self.poll_seconds * (IDLE_FACTOR if idle else 1), 2 * self.next_poll)
        elif seconds == LOCAL_WAIT_SLEEP:
            # Only a message being handled waits for a local reply: the next round is near.
            seconds = self.local_wait_seconds
            self.next_poll = min(self.poll_seconds, FIRST_POLL_SECONDS)
            self.last_message = self.clock()
        time.sleep(seconds)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def poll_seconds_from(env: dict[str, str] | os._Environ[str]) -> float:
    raw = env.get(POLL_ENV, "")
    if not raw:
        return DEFAULT_POLL_SECONDS
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{POLL_ENV}={raw!r}: expected a number of seconds > 0") from None


def heartbeat_seconds_from(env: dict[str, str] | os._Environ[str]) -> float | None:
    """The heartbeat interval `env` asks for, or None for Flower's own."""
    raw = env.get(HEARTBEAT_ENV, "").strip()
    if not raw:
        return None
    low, high = HEARTBEAT_RANGE
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not low <= seconds <= high:
        raise ValueError(f"{HEARTBEAT_ENV}={raw!r}: expected seconds from {low:g} to {high:g} "
                         "(the range Flower's server accepts)")
    return seconds


def set_heartbeat(connection_module: ModuleType, heartbeat_module: ModuleType, seconds: float) -> None:
    """Have the SuperNode declare, and keep, a heartbeat every `seconds`: the connection module
    declares the interval to the server, the heartbeat module paces the sends by it."""
    for module in (connection_module, heartbeat_module):
        if not isinstance(getattr(module, "HEARTBEAT_DEFAULT_INTERVAL", None), int | float):
            raise RuntimeError(f"{module.__name__} no longer reads HEARTBEAT_DEFAULT_INTERVAL; "
                               "check the pinned flwr version")
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds  # type: ignore[attr-defined]


def pace(loop_module: ModuleType, poll_seconds: float) -> None:
    """Give Flower's SuperNode loop module the paced `time`."""
    if getattr(loop_module, "time", None) is not time:
        raise RuntimeError(f"{loop_module.__name__} no longer uses the time module this paces; "
                           "check the pinned flwr version")
    loop_module.time = PacedTime(poll_seconds)  # type: ignore[attr-defined]


def warm_superexec(loop_module: ModuleType) -> None:
    """Have Flower's SuperNode start Pollinate's SuperExec (superexec.py: ClientApp processes
    forked warm) where it starts `flower-superexec`, with the same flags."""
    if getattr(loop_module, "subprocess", None) is not subprocess:
        raise RuntimeError(f"{loop_module.__name__} no longer starts the SuperExec through the "
                           "subprocess module; check the pinned flwr version")
    loop_module.subprocess = Rerouted(  # type: ignore[attr-defined]
        SUPEREXEC_COMMAND, lambda args, kwargs: subprocess.Popen(superexec_command(args), **kwargs))


def patient_claims(state_module: ModuleType, seconds: float = CLAIM_START_SECONDS) -> None:
    """Have Flower's in-memory task state (`state_module.InMemoryCoreState`, which the
    SuperNode's state extends) give a claimed task `seconds` to start."""
    state_cls = getattr(state_module, "InMemoryCoreState", None)
    original = getattr(state_cls, "claim_task", None)
    if state_cls is None or original is None or not callable(getattr(state_module, "now", None)):
        raise RuntimeError(f"{state_module.__name__} no longer claims tasks as this expects; "
                           "check the pinned flwr version")
    if getattr(original, "patient_seconds", None) is not None:
        return

    def claim_task(self: Any, task_id: int) -> str | None:
        token = original(self, task_id)
        if token is not None:
            with self.lock_task_store:
                record = self.task_token_store.get(task_id)
                if record is not None:
                    record.active_until = max(record.active_until,
                                              state_module.now() + timedelta(seconds=seconds))
        return token

    claim_task.patient_seconds = seconds  # type: ignore[attr-defined]
    state_cls.claim_task = claim_task  # type: ignore[attr-defined]


def answer_failed_clientapps(nodestate_module: ModuleType) -> None:
    """Have Flower's SuperNode state (`nodestate_module.InMemoryNodeState`) answer a message
    whose ClientApp task ended as failed without a reply, with Flower's own "ClientApp stopped
    responding" error, as it already does for an AgentApp that fails.

    Flower 1.41 inserts that error only when a ClientApp's task token lapses. A ClientApp that
    ends by itself without pushing a reply (its heartbeat was refused and it stopped itself,
    it could not read its message, or pushing the reply failed) finishes its task as failed,
    so no token lapses, and the SuperNode, which handles one message at a time, waits for
    that reply forever: the site answers no later round or run until it is restarted."""
    state_cls = getattr(nodestate_module, "InMemoryNodeState", None)
    original = getattr(state_cls, "finish_task", None)
    crashed = getattr(nodestate_module, "CLIENT_APP_CRASHED_ERROR", None)
    if (original is None or crashed is None or not hasattr(state_cls, "_store_error_replies")
            or not hasattr(state_cls, "get_tasks")):
        raise RuntimeError(f"{nodestate_module.__name__} no longer finishes tasks as this expects; "
                           "check the pinned flwr version")
    if getattr(original, "answers_failed_clientapps", False):
        return
    from flwr.common.constant import SubStatus
    from flwr.supercore.constant import TaskType

    def finish_task(self: Any, task_id: int, sub_status: str, details: str) -> bool:
        finished = original(self, task_id, sub_status, details)
        if finished and sub_status == SubStatus.FAILED:
            tasks = self.get_tasks(task_ids=[task_id])
            if tasks and tasks[0].type == TaskType.CLIENT_APP:
                # Only messages of the run taken and not yet answered get one.
                self._store_error_replies({tasks[0].run_id}, crashed)
        return finished

    finish_task.answers_failed_clientapps = True  # type: ignore[attr-defined]
    state_cls.finish_task = finish_task  # type: ignore[attr-defined]


class ForeignApp(Exception):
    """A run's app bundle is not one this site runs."""


def only_pollinate_apps(loop_module: ModuleType, allowed: frozenset[str]) -> None:
    """Have Flower's SuperNode loop refuse every run whose bundle hash is not in `allowed`,
    the way it refuses a bundle that fails its own verification: an INVALID_FAB error reply
    to the message, the run not stored, nothing launched."""
    from logging import ERROR

    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.common.logger import log

    from .app_bundle import refusal

    original = getattr(loop_module, "_pull_and_store_message", None)
    insert = getattr(loop_module, "_insert_message", None)
    if original is None or insert is None or "get_fab" not in inspect.signature(original).parameters:
        raise RuntimeError(f"{loop_module.__name__} no longer pulls runs' bundles as this expects; "
                           "check the pinned flwr version")
    if getattr(original, "allowed_bundles", None) is not None:
        return

    def pull_and_store_message(*, state: Any, object_store: Any, receive: Callable[[], Any],
                               get_fab: Callable[[str, int], Any], **rest: Any) -> int | None:
        pulled: list[Any] = []

        def receive_and_keep() -> Any:
            got = receive()
            pulled[:] = [got[0]] if got else []
            return got

        def checked_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            if fab.hash_str not in allowed or hashlib.sha256(fab.content).hexdigest() != fab.hash_str:
                raise ForeignApp(refusal(fab.hash_str, fab.content))
            return fab

        try:
            return original(state=state, object_store=object_store, receive=receive_and_keep,
                            get_fab=checked_fab, **rest)
        except ForeignApp as refused:
            message = pulled[0]
            log(ERROR, "refused run %s: %s", message.metadata.run_id, refused)
            reply = Message(Error(ErrorCode.INVALID_FAB, str(refused)), reply_to=message)
            insert(reply, state, object_store)
            return message.metadata.run_id

    pull_and_store_message.allowed_bundles = allowed  # type: ignore[attr-defined]
    loop_module._pull_and_store_message = pull_and_store_message  # type: ignore[attr-defined]


def reply_before_pulling_again(loop_module: ModuleType) -> None:
    """Have Flower's SuperNode loop push the reply to the message it just pulled before it
    pulls another, whatever other replies its state holds.

    Flower 1.41 handles one message at a time: pull it, then wait for *a* reply, push it, pull
    again. Any reply that is not the current message's (left over from an earlier message: a
    ClientApp whose reply was stored twice, an error reply for a message whose ClientApp
    replied after all) satisfies that wait; the current reply then stays in the state, pushed
    only after the next message is pulled, which the server never sends while it waits for
    this reply. The site falls one reply behind for good and misses every round after it. Here
    the loop keeps pushing until the current message is answered (Flower deletes a message
    from the state once its reply is pushed or could not be)."""
    pull = getattr(loop_module, "_pull_and_store_message", None)
    push = getattr(loop_module, "_push_messages", None)
    if pull is None or push is None or "receive" not in inspect.signature(pull).parameters:
        raise RuntimeError(f"{loop_module.__name__} no longer pulls and pushes messages as this "
                           "expects; check the pinned flwr version")
    if getattr(push, "one_reply_per_message", False):
        return
    current: list[str] = []  # the message pulled last, until its reply is pushed

    def pull_and_store_message(*, receive: Callable[[], Any], **rest: Any) -> int | None:
        def receive_and_note() -> Any:
            got = receive()
            current[:] = [got[0].metadata.message_id] if got else []
            return got

        return pull(receive=receive_and_note, **rest)

    def push_messages(*, state: Any, **rest: Any) -> None:
        push(state=state, **rest)
        while current and current[0] in state.msg_store:
            push(state=state, **rest)
        current.clear()

    push_messages.one_reply_per_message = True  # type: ignore[attr-defined]
    loop_module._pull_and_store_message = pull_and_store_message  # type: ignore[attr-defined]
    loop_module._push_messages = push_messages  # type: ignore[attr-defined]


def prepare(loop_module: ModuleType, env: dict[str, str] | os._Environ[str]) -> None:
    """Everything this module changes in Flower's SuperNode loop, as `env` asks."""
    from .app_bundle import allowed_bundles

    pace(loop_module, poll_seconds_from(env))
    only_pollinate_apps(loop_module, allowed_bundles(env))
    reply_before_pulling_again(loop_module)
    if warm_enabled(env):
        warm_superexec(loop_module)


def exit_when_done(entry: Callable[[], object]) -> NoReturn:
    """Run `entry` and end the process with its outcome, whatever threads it leaves running.

    Flower 1.41's SuperNode leaves its runtime API's uvicorn thread (not a daemon) running
    when it gives up reconnecting: the interpreter would wait for that thread forever and
    `pollinate-client join` would never learn that the server is gone."""
    code = 0
    try:
        entry()
    except SystemExit as stop:  # as the interpreter treats it: None is 0, a message is 1
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    from flwr.supercore import heartbeat
    from flwr.supercore.corestate import in_memory_corestate
    from flwr.supernode import fleet_http_connection, start_client_internal
    from flwr.supernode.cli import flower_supernode
    from flwr.supernode.nodestate import in_memory_nodestate

    patient_claims(in_memory_corestate)
    answer_failed_clientapps(in_memory_nodestate)

    try:
        prepare(start_client_internal, os.environ)
        seconds = heartbeat_seconds_from(os.environ)
        if seconds is not None:
            set_heartbeat(fleet_http_connection, heartbeat, seconds)
    except ValueError as err:
        sys.exit(f"pollinate supernode: {err}")
    sys.argv[0] = "flower-supernode"
    exit_when_done(flower_supernode)


if __name__ == "__main__":
    main()
