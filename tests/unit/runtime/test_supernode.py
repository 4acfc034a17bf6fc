"""The paced SuperNode: Flower 1.41's fixed waits are where the pacing expects them, and only
those waits change."""

from __future__ import annotations

import hashlib
import inspect
import subprocess
import sys
import time
import types

import pollinate_runtime
import pytest
from flwr.supernode import start_client_internal
from pollinate_runtime import app_bundle, supernode


def test_flowers_supernode_loop_still_has_the_waits_the_pacing_replaces():
    source = inspect.getsource(start_client_internal)
    assert start_client_internal.time is time
    assert f"time.sleep({supernode.IDLE_PULL_SLEEP})" in source
    assert f"time.sleep({supernode.LOCAL_WAIT_SLEEP})" in source


def test_paced_time_shortens_only_the_idle_pull_and_the_local_waits(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    paced = supernode.PacedTime(1.0)
    for seconds in (3, 0.5, 2, 0.1):
        paced.sleep(seconds)
    assert slept == [1.0, supernode.LOCAL_WAIT_SECONDS, 2, 0.1]
    assert paced.monotonic is time.monotonic  # everything else is the real module


def test_an_idle_site_polls_fast_after_a_message_and_backs_off_to_the_poll_interval(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    paced = supernode.PacedTime(1.0)
    for seconds in (3, 3, 0.5, 0.5, 3, 3, 3, 3, 3, 3):  # idle, a message, idle again
        paced.sleep(seconds)
    local = supernode.LOCAL_WAIT_SECONDS
    assert slept == [1.0, 1.0, local, local, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_a_site_without_work_for_a_minute_backs_off_further(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    now = [0.0]
    paced = supernode.PacedTime(1.0, clock=lambda: now[0])
    for _ in range(3):
        paced.sleep(3)
    now[0] = supernode.IDLE_AFTER_SECONDS + 1  # between runs
    for _ in range(5):
        paced.sleep(3)
    paced.sleep(0.5)  # a message: the next round is near
    for _ in range(6):
        paced.sleep(3)
    local = supernode.LOCAL_WAIT_SECONDS
    assert slept == [1.0, 1.0, 1.0, 1.0, 2.0, 4.0, 4.0, 4.0, local, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert supernode.IDLE_FACTOR * 1.0 == 4.0


def test_a_poll_interval_below_the_fast_poll_is_kept(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    paced = supernode.PacedTime(0.05)
    for seconds in (3, 0.5, 3, 3):
        paced.sleep(seconds)
    assert slept == [0.05, supernode.LOCAL_WAIT_SECONDS, 0.05, 0.05]


def test_pace_refuses_a_loop_that_no_longer_uses_the_time_module():
    moved = types.ModuleType("moved")
    with pytest.raises(RuntimeError, match="pinned flwr"):
        supernode.pace(moved, 1.0)


@pytest.mark.parametrize("raw", ["soon", "0", "-1"])
def test_a_bad_poll_interval_is_refused_naming_the_variable(raw):
    with pytest.raises(ValueError, match=supernode.POLL_ENV):
        supernode.PacedTime(supernode.poll_seconds_from({supernode.POLL_ENV: raw}))


def test_the_heartbeat_interval_is_declared_and_kept_by_the_modules_it_is_set_in():
    from flwr.common import constant
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    # Flower reads the interval from these two modules' own names: where the node declares
    # it to the server (activation and every heartbeat), and where the sender paces itself.
    assert "heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL" in inspect.getsource(fleet_http_connection)
    assert "HEARTBEAT_DEFAULT_INTERVAL - HEARTBEAT_CALL_TIMEOUT" in inspect.getsource(heartbeat)
    assert supernode.HEARTBEAT_RANGE == (constant.HEARTBEAT_MIN_INTERVAL, constant.HEARTBEAT_MAX_INTERVAL)
    connection, sender = types.ModuleType("connection"), types.ModuleType("sender")
    connection.HEARTBEAT_DEFAULT_INTERVAL = sender.HEARTBEAT_DEFAULT_INTERVAL = 30
    supernode.set_heartbeat(connection, sender, 10.0)
    assert connection.HEARTBEAT_DEFAULT_INTERVAL == sender.HEARTBEAT_DEFAULT_INTERVAL == 10.0
    with pytest.raises(RuntimeError, match="pinned flwr"):
        supernode.set_heartbeat(types.ModuleType("moved"), sender, 10.0)


@pytest.mark.parametrize(("raw", "seconds"), [("", None), ("10", 10.0), (" 45 ", 45.0), ("1800", 1800.0)])
def test_the_heartbeat_interval_comes_from_the_environment(raw, seconds):
    assert supernode.heartbeat_seconds_from({supernode.HEARTBEAT_ENV: raw}) == seconds
    assert supernode.heartbeat_seconds_from({}) is None


@pytest.mark.parametrize("raw", ["9.9", "1801", "often", "nan", "-10"])
def test_a_heartbeat_interval_flowers_server_would_refuse_is_named(raw):
    with pytest.raises(ValueError, match=rf"{supernode.HEARTBEAT_ENV}=.*expected seconds from 10 to 1800"):
        supernode.heartbeat_seconds_from({supernode.HEARTBEAT_ENV: raw})


@pytest.mark.slow  # starts a Python process with Flower's imports
def test_the_paced_supernode_is_flower_supernode_with_its_flags():
    out = subprocess.run([sys.executable, "-m", "pollinate_runtime.supernode", "--help"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "--superlink" in out and "--auth-supernode-private-key" in out


EXIT_PROBE = """
import threading, time, sys
from pollinate_runtime.supernode import exit_when_done

def entry():
    # What Flower's SuperNode leaves behind when it gives up: a thread that is not a daemon.
    threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()
    print("giving up", flush=True)
    {end}

exit_when_done(entry)
"""


@pytest.mark.parametrize(("end", "code", "stderr"), [
    ("return", 0, ""),
    ("raise ConnectionRefusedError(111, 'Connection refused')", 1, "ConnectionRefusedError"),
    ("sys.exit(3)", 3, ""),
    ("sys.exit('pollinate supernode: bad flag')", 1, "bad flag"),
])
def test_the_supernode_ends_with_its_outcome_whatever_threads_it_leaves(end, code, stderr):
    result = subprocess.run([sys.executable, "-c", EXIT_PROBE.format(end=end)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result
    assert result.stdout == "giving up\n" and stderr in result.stderr


class FakeNow:
    """Flower's task state reads the time through its module's `now`."""

    def __init__(self) -> None:
        from datetime import UTC, datetime

        self.at = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self):
        return self.at

    def advance(self, seconds: float) -> None:
        from datetime import timedelta

        self.at += timedelta(seconds=seconds)


@pytest.fixture
def node_state(monkeypatch):
    """The SuperNode's own task state, on a clock the test moves; the class patch is undone."""
    from flwr.supercore.corestate import in_memory_corestate
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    clock = FakeNow()
    monkeypatch.setattr(in_memory_corestate, "now", clock)
    monkeypatch.setattr(in_memory_corestate.InMemoryCoreState, "claim_task",
                        in_memory_corestate.InMemoryCoreState.claim_task)
    return InMemoryNodeState(ObjectStoreFactory().store()), clock, in_memory_corestate


def claim(state) -> str:
    task_id = state.create_task(task_type="clientapp", run_id=1, fab_hash="f")
    token = state.claim_task(task_id)
    assert token is not None
    return token


def test_flower_gives_a_claimed_clientapp_30_s_to_start(node_state):
    # What patient_claims is for: if Flower waits longer itself, the patch may go.
    state, clock, _ = node_state
    token = claim(state)
    clock.advance(29)
    assert state.get_task_by_token(token) is not None
    clock.advance(2)
    assert state.get_task_by_token(token) is None


def test_a_clientapp_slow_to_start_keeps_its_claim_for_two_minutes(node_state):
    state, clock, module = node_state
    supernode.patient_claims(module)
    supernode.patient_claims(module)  # once is enough: not wrapped twice
    assert module.InMemoryCoreState.claim_task.patient_seconds == supernode.CLAIM_START_SECONDS
    token = claim(state)
    clock.advance(supernode.CLAIM_START_SECONDS - 5)
    task = state.get_task_by_token(token)
    assert task is not None
    # Once it has started, a ClientApp that goes quiet is given up on as Flower does.
    assert state.activate_task(task.task_id)
    clock.advance(61)
    assert state.get_task_by_token(token) is None


def test_patient_claims_refuses_a_flower_whose_task_state_moved():
    with pytest.raises(RuntimeError, match="no longer claims tasks"):
        supernode.patient_claims(types.ModuleType("moved"))


@pytest.mark.slow  # starts a Python process with Flower's imports
def test_the_command_applies_every_change_to_flowers_supernode() -> None:
    # main() as `pollinate-client join` runs it, with Flower's SuperNode swapped for a probe
    # that reports what this module changed: how long a claimed ClientApp has to start, and
    # whether failed ClientApps are answered for and each reply is pushed before the next pull.
    probe = ("import flwr.supernode.cli as cli\n"
             "from flwr.supercore.corestate.in_memory_corestate import InMemoryCoreState\n"
             "from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState\n"
             "from flwr.supernode import start_client_internal as loop\n"
             "cli.flower_supernode = lambda: print(InMemoryCoreState.claim_task.patient_seconds,\n"
             "    InMemoryNodeState.finish_task.answers_failed_clientapps,\n"
             "    loop._push_messages.one_reply_per_message)\n"
             "from pollinate_runtime import supernode\n"
             "supernode.main()\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    seconds, answers, one_reply = result.stdout.split()
    assert float(seconds) == supernode.CLAIM_START_SECONDS
    assert answers == one_reply == "True"


# ---- only Pollinate's own client app -------------------------------------------------------


def fake_loop(fab_content: bytes, fab_hash: str | None = None) -> tuple[types.ModuleType, list]:
    """A SuperNode loop module whose pull receives one message of run 7 and fetches its bundle,
    as Flower's does; `inserted` collects the replies put in the node's state."""
    from flwr.app import Metadata, RecordDict
    from flwr.app.message.message import make_message
    from flwr.supercore.fab import Fab

    loop, inserted = types.ModuleType("loop"), []
    message = make_message(Metadata(run_id=7, message_id="m1", src_node_id=0, dst_node_id=1,
                                    reply_to_message_id="", group_id="1", created_at=time.time(),
                                    ttl=60.0, message_type="train"), RecordDict())

    def pull(*, state, object_store, node_config, receive, get_run, get_fab, pull_object,
             confirm_message_received, trusted_entities):
        got, _ = receive()
        get_fab(fab_hash or hashlib.sha256(fab_content).hexdigest(), got.metadata.run_id)
        loop.launched = True
        return got.metadata.run_id

    loop._pull_and_store_message = pull
    loop._insert_message = lambda msg, state, store: inserted.append(msg)
    loop.launched = False
    loop.receive = lambda: (message, None)
    loop.get_fab = lambda h, run_id: Fab(h, fab_content, {})
    return loop, inserted


def pull_once(loop: types.ModuleType) -> int | None:
    return loop._pull_and_store_message(
        state=None, object_store=None, node_config={}, receive=loop.receive, get_run=None,
        get_fab=loop.get_fab, pull_object=None, confirm_message_received=None, trusted_entities=None)


def foreign_bundle(version: str = "6.6.6") -> bytes:
    from flwr.cli.build import build_fab_from_files

    pyproject = (f'[project]\nname = "evil"\nversion = "{version}"\n[tool.flwr.app]\n'
                 'publisher = "mallory"\n[tool.flwr.app.components]\n'
                 'serverapp = "pollinate_runtime.server_app:app"\nclientapp = "evil:app"\n')
    return build_fab_from_files({"pyproject.toml": pyproject.encode(), "evil.py": b"import os\n"})[0]


def test_pollinates_own_bundle_runs():
    loop, inserted = fake_loop(app_bundle.app_bundle())
    supernode.only_pollinate_apps(loop, app_bundle.allowed_bundles({}))
    assert pull_once(loop) == 7 and loop.launched and not inserted


def test_a_foreign_bundle_is_refused_naming_both_hashes_and_nothing_runs():
    from flwr.common.constant import ErrorCode

    content = foreign_bundle()
    loop, inserted = fake_loop(content)
    supernode.only_pollinate_apps(loop, app_bundle.allowed_bundles({}))
    assert pull_once(loop) == 7  # handled: the loop goes on to push the reply
    assert not loop.launched
    (reply,) = inserted
    assert reply.error.code == ErrorCode.INVALID_FAB
    foreign = hashlib.sha256(content).hexdigest()
    assert foreign in reply.error.reason and app_bundle.app_bundle_hash() in reply.error.reason
    assert "app 'evil' version '6.6.6'" in reply.error.reason
    assert f"pollinate {pollinate_runtime.__version__}" in reply.error.reason


def test_a_bundle_that_claims_pollinates_hash_with_other_bytes_is_refused():
    loop, inserted = fake_loop(foreign_bundle(), fab_hash=app_bundle.app_bundle_hash())
    supernode.only_pollinate_apps(loop, app_bundle.allowed_bundles({}))
    pull_once(loop)
    assert not loop.launched and len(inserted) == 1


def test_a_site_may_allow_another_bundle_by_its_hash():
    content = foreign_bundle()
    loop, inserted = fake_loop(content)
    also = " " + hashlib.sha256(content).hexdigest().upper()
    allowed = app_bundle.allowed_bundles({app_bundle.ALLOWED_ENV: also})
    supernode.only_pollinate_apps(loop, allowed)
    assert pull_once(loop) == 7 and loop.launched and not inserted


@pytest.mark.parametrize("raw", ["abc", "g" * 64, "a" * 63 + ",x"])
def test_an_allowed_bundle_that_is_not_a_hash_is_named(raw):
    with pytest.raises(ValueError, match=app_bundle.ALLOWED_ENV):
        app_bundle.allowed_bundles({app_bundle.ALLOWED_ENV: raw})


@pytest.mark.parametrize(("content", "said"), [
    (b"not a zip", "not a readable FAB"),
    (b"x" * (app_bundle.MAX_DESCRIBED_BYTES + 1), "an app bundle of"),
])
def test_a_malformed_bundle_is_described_without_being_trusted(content, said):
    assert said in app_bundle.describe(content)


def test_pollinates_bundle_is_one_per_version_and_the_one_the_operator_sends():
    from pollinate_operator.clients.flower import pollinate_fab

    app_bundle.app_bundle.cache_clear()
    first = app_bundle.app_bundle()
    app_bundle.app_bundle.cache_clear()
    assert app_bundle.app_bundle() == first
    assert pollinate_fab().hash_str == app_bundle.app_bundle_hash()
    assert f"app 'pollinate' version '{pollinate_runtime.__version__}'" == app_bundle.describe(first)


def test_flowers_supernode_loop_still_pulls_bundles_as_the_check_expects():
    from flwr.supernode import start_client_internal as real

    assert "get_fab = " not in inspect.getsource(real._pull_and_store_message)  # only the argument
    assert "fab = get_fab(run_info.fab_hash, run_id)" in inspect.getsource(real._pull_and_store_message)
    assert "get_fab=get_fab" in inspect.getsource(real)  # the loop passes it by name
    copy = types.ModuleType("copy")
    copy._pull_and_store_message, copy._insert_message = real._pull_and_store_message, real._insert_message
    supernode.only_pollinate_apps(copy, frozenset())
    with pytest.raises(RuntimeError, match="pinned flwr"):
        supernode.only_pollinate_apps(types.ModuleType("moved"), frozenset())


# ---- a ClientApp that ends without replying ------------------------------------------------


@pytest.fixture
def answering_state(monkeypatch):
    """The SuperNode's state with `answer_failed_clientapps` applied (undone afterwards) and
    one message of run 1 that a ClientApp task has taken."""
    from flwr.app import Message, RecordDict
    from flwr.app.metadata import Metadata
    from flwr.supercore.constant import TaskType
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate import in_memory_nodestate

    cls = in_memory_nodestate.InMemoryNodeState
    monkeypatch.setattr(cls, "finish_task", cls.finish_task)
    supernode.answer_failed_clientapps(in_memory_nodestate)
    supernode.answer_failed_clientapps(in_memory_nodestate)  # once is enough: not wrapped twice
    state = cls(ObjectStoreFactory().store())
    message = Message(metadata=Metadata(run_id=1, message_id="", src_node_id=1, dst_node_id=5,
                                        reply_to_message_id="", group_id="2", created_at=time.time(),
                                        ttl=600, message_type="train"), content=RecordDict())
    message.metadata.__dict__["_message_id"] = message.object_id
    state.store_message(message)
    assert state.get_messages_legacy(run_ids=[1], is_reply=False, limit=1)  # the ClientApp took it
    task_id = state.create_task(task_type=TaskType.CLIENT_APP, run_id=1, fab_hash="f")
    assert state.claim_task(task_id) and state.activate_task(task_id)
    return state, task_id, message


def test_a_clientapp_that_fails_without_a_reply_is_answered_for(answering_state):
    from flwr.common.constant import ErrorCode, SubStatus

    state, task_id, message = answering_state
    assert state.finish_task(task_id, SubStatus.FAILED, "pushing the reply failed")
    replies = state.get_messages_legacy(is_reply=True)
    assert [r.metadata.reply_to_message_id for r in replies] == [message.metadata.message_id]
    assert replies[0].error.code == ErrorCode.CLIENT_APP_CRASHED


def test_a_failed_clientapp_whose_reply_arrived_gets_no_second_one(answering_state):
    from flwr.app import Message, RecordDict
    from flwr.common.constant import SubStatus

    state, task_id, message = answering_state
    reply = Message(RecordDict(), reply_to=message)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    state.store_message(reply)
    assert state.finish_task(task_id, SubStatus.FAILED, "its context could not be saved")
    assert [r.object_id for r in state.get_messages_legacy(is_reply=True)] == [reply.object_id]


def test_a_clientapp_that_completes_is_left_to_its_own_reply(answering_state):
    from flwr.common.constant import SubStatus

    state, task_id, _ = answering_state
    assert state.finish_task(task_id, SubStatus.COMPLETED, "")
    assert not state.get_messages_legacy(is_reply=True)


def test_answering_refuses_a_flower_whose_node_state_moved():
    with pytest.raises(RuntimeError, match="no longer finishes tasks"):
        supernode.answer_failed_clientapps(types.ModuleType("moved"))


# ---- the reply to the message pulled, before the next pull --------------------------------


def flower_message(message_id_hint: str):
    from flwr.app import Message, RecordDict
    from flwr.app.metadata import Metadata

    return Message(metadata=Metadata(run_id=1, message_id="", src_node_id=1, dst_node_id=5,
                                     reply_to_message_id="", group_id=message_id_hint,
                                     created_at=time.time(), ttl=600, message_type="train"),
                   content=RecordDict())


class ReplyLater:
    """Stands in for the loop module's `time`: the first wait for a reply is when the
    ClientApp's reply to `message` arrives."""

    def __init__(self, state, store, message) -> None:
        self.state, self.store, self.message = state, store, message

    def sleep(self, seconds: float) -> None:
        from flwr.app import Message, RecordDict

        if self.message is not None:
            start_client_internal._insert_message(Message(RecordDict(), reply_to=self.message),
                                                  self.state, self.store)
            self.message = None

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def loop_with_a_stale_reply(monkeypatch):
    """Flower's real push step and state, a message M2 just pulled, and in the state a reply
    to an earlier message M1 that is gone: returns (loop module, state, M1, M2, sent)."""
    from flwr.app import Message, RecordDict
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    store = ObjectStoreFactory().store()
    state = InMemoryNodeState(store)
    earlier, current = flower_message("1"), flower_message("2")
    for m in (earlier, current):
        m.metadata.__dict__["_message_id"] = m.object_id
    start_client_internal._insert_message(Message(RecordDict(), reply_to=earlier), state, store)
    monkeypatch.setattr(start_client_internal, "time", ReplyLater(state, store, current))

    loop = types.ModuleType("loop")

    def pull(*, state, object_store, receive, **_):
        got = receive()
        start_client_internal._insert_message(got[0], state, object_store)
        return got[0].metadata.run_id

    loop._pull_and_store_message = pull
    loop._push_messages = start_client_internal._push_messages
    sent: list[str] = []

    def send(message, tree, runtime):
        sent.append(message.metadata.reply_to_message_id)
        return set(), "session"

    def step() -> None:
        loop._pull_and_store_message(state=state, object_store=store, receive=lambda: (current, None))
        loop._push_messages(state=state, object_store=store, send=send, push_object=None)

    loop.step = step
    return loop, state, earlier, current, sent


def test_flowers_loop_alone_falls_one_reply_behind(loop_with_a_stale_reply):
    # Why reply_before_pulling_again exists: if Flower waits for the current reply itself,
    # this fails and the patch may go.
    loop, state, earlier, current, sent = loop_with_a_stale_reply
    loop.step()
    assert sent == [earlier.metadata.message_id]
    assert current.metadata.message_id in state.msg_store  # its reply waits for the next pull


def test_a_site_pushes_the_current_reply_before_pulling_again(loop_with_a_stale_reply):
    loop, state, earlier, current, sent = loop_with_a_stale_reply
    supernode.reply_before_pulling_again(loop)
    supernode.reply_before_pulling_again(loop)  # once is enough: not wrapped twice
    loop.step()
    assert sent == [earlier.metadata.message_id, current.metadata.message_id]
    assert not state.msg_store


def test_reply_before_pulling_again_refuses_a_flower_whose_loop_moved():
    with pytest.raises(RuntimeError, match="no longer pulls and pushes"):
        supernode.reply_before_pulling_again(types.ModuleType("moved"))
