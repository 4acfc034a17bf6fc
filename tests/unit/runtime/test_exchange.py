"""How the server's message exchange treats sites that go offline mid-round: against a fake
grid (pure logic; the real SuperLink is in tests/integration/test_engine.py)."""

from __future__ import annotations

import math

import httpx
import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from pollinate_runtime import messages as m
from pollinate_runtime.rounds import FederatedRun
from pollinate_runtime.run_config import RunConfig

pytestmark = pytest.mark.usefixtures("task_identity")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeGrid:
    """Nodes answer the message they were sent; an `offline` node's messages come back as
    the SuperLink's NODE_UNAVAILABLE error until the clock reaches its return time. A `stuck`
    node is online and never answers: its message comes back MESSAGE_UNAVAILABLE when its TTL
    runs out. Pushes fail as the SuperLink's 500 once the clock reaches `refuse_pushes_from`."""

    def __init__(self, clock: Clock, nodes: list[int], offline_until: dict[int, float],
                 stuck: tuple[int, ...] = (), refuse_pushes_from: float = math.inf) -> None:
        self.clock = clock
        self.nodes = nodes
        self.offline_until = offline_until
        self.stuck = stuck
        self.refuse_pushes_from = refuse_pushes_from
        self.sent: list[tuple[int, float]] = []
        self._inbox: dict[str, Message] = {}
        self._expires: dict[str, float] = {}
        self._count = 0

    def get_node_ids(self) -> list[int]:
        self.clock.now += 0.5
        return [n for n in self.nodes if self.clock.now >= self.offline_until.get(n, 0.0)]

    def push_messages(self, messages: list[Message]) -> list[str]:
        if self.clock.now >= self.refuse_pushes_from:
            request = httpx.Request("POST", "https://superlink/v1/runtime/push-messages")
            raise httpx.HTTPStatusError("Server error '500 Internal Server Error'", request=request,
                                        response=httpx.Response(500, request=request))
        ids = []
        for msg in messages:
            self._count += 1
            mid = f"m{self._count}"
            msg.metadata.__dict__["_message_id"] = mid
            self._inbox[mid] = msg
            self._expires[mid] = self.clock.now + msg.metadata.ttl
            self.sent.append((msg.metadata.dst_node_id, self.clock.now))
            ids.append(mid)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        self.clock.now += 1.0  # each poll takes a second of the round
        replies = []
        for mid in ids:
            node = self._inbox[mid].metadata.dst_node_id
            if node in self.stuck:
                if self.clock.now >= self._expires[mid]:
                    replies.append(Message(Error(ErrorCode.MESSAGE_UNAVAILABLE, "expired"),
                                           reply_to=self._inbox.pop(mid)))
                continue
            msg = self._inbox.pop(mid)
            if self.clock.now < self.offline_until.get(node, 0.0):
                replies.append(Message(Error(ErrorCode.NODE_UNAVAILABLE, "no heartbeat"), reply_to=msg))
            else:
                replies.append(Message(RecordDict({m.CONFIG: ConfigRecord({m.SITE: f"site-{node}"})}),
                                       reply_to=msg))
        return replies




def exchange(grid: FakeGrid, clock: Clock, timeout: float = 30.0, **config) -> tuple:
    run = FederatedRun(grid, RunConfig(round_timeout_seconds=timeout, **config), store=None,  # type: ignore[arg-type]
                       poll_seconds=0.0, clock=clock)
    got: list[str] = []
    out = run.exchange(grid.nodes, "train",
                       lambda _: RecordDict({m.CONFIG: ConfigRecord({m.ROUND: 1})}), 1,
                       lambda reply: got.append(reply.site))
    return out, got


def test_a_site_offline_at_first_is_sent_the_round_again_when_it_is_back() -> None:
    clock = Clock()
    grid = FakeGrid(clock, [1, 2], offline_until={2: 5.0})
    out, got = exchange(grid, clock)
    assert sorted(got) == ["site-1", "site-2"]
    assert out.failed == {}
    assert [n for n, _ in grid.sent].count(2) == 2  # once at the start, once when back


def test_a_site_that_never_comes_back_fails_at_the_deadline_as_offline() -> None:
    clock = Clock()
    grid = FakeGrid(clock, [1, 2], offline_until={2: 1e9})
    out, got = exchange(grid, clock, timeout=10.0)
    assert got == ["site-1"]
    assert out.failed[2].startswith("no reply within 10 s (offline: ")


def test_site_nodes_limit_the_exchange_to_the_runs_sites_and_name_them() -> None:
    clock = Clock()
    grid = FakeGrid(clock, [1, 2, 3], offline_until={})
    run = FederatedRun(grid, RunConfig(site_nodes={"hospital-a": 1, "alice-laptop": 3}),  # type: ignore[arg-type]
                       store=None, poll_seconds=0.0, clock=clock)  # type: ignore[arg-type]
    assert run.wait_for_nodes(2) == [1, 3]
    got: list[str] = []
    run.exchange([1, 3], "train", lambda _: RecordDict(), 1, lambda reply: got.append(reply.site))
    # Named by the key they authenticated with, not by what they say.
    assert sorted(got) == ["alice-laptop", "hospital-a"]


def test_a_message_that_expires_at_the_deadline_is_not_sent_again() -> None:
    # CI: every ClientApp of a loaded site failed to start, the message's TTL (the round's
    # deadline) ran out, and the SuperLink refused the resend as already expired: the run
    # failed instead of closing the round without that site.
    clock = Clock()
    grid = FakeGrid(clock, [1, 2], offline_until={}, stuck=(2,))
    out, got = exchange(grid, clock, timeout=20.0)
    assert got == ["site-1"]
    assert [n for n, _ in grid.sent].count(2) == 1
    assert out.failed[2].startswith("no reply within 20 s")


def test_a_resend_the_superlink_refuses_leaves_the_site_waited_for() -> None:
    clock = Clock()
    grid = FakeGrid(clock, [1, 2], offline_until={2: 5.0}, refuse_pushes_from=1.0)
    out, got = exchange(grid, clock, timeout=30.0)
    assert got == ["site-1"]
    assert out.failed[2].startswith("no reply within 30 s (offline: ")
    assert [n for n, _ in grid.sent] == [1, 2]  # the resends were refused


def test_the_server_polls_fast_after_a_reply_and_backs_off_while_none_comes(monkeypatch) -> None:
    from pollinate_runtime import rounds

    slept: list[float] = []
    monkeypatch.setattr(rounds.time, "sleep", slept.append)
    clock = Clock()
    grid = FakeGrid(clock, [1, 2, 3], offline_until={}, stuck=(2, 3))
    run = FederatedRun(grid, RunConfig(round_timeout_seconds=7.5), store=None,  # type: ignore[arg-type]
                       poll_seconds=0.1, clock=clock)
    run.exchange(grid.nodes, "train", lambda _: RecordDict(), 1, lambda reply: None)
    # Site 1 answers the first pull; 2 and 3 never do: 0.1 s, then doubling up to the cap.
    assert slept[:5] == pytest.approx([0.1, 0.2, 0.4, rounds.MAX_POLL_SECONDS, rounds.MAX_POLL_SECONDS])
