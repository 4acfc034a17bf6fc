"""The server's round loop (rounds.FederatedRun) against a fake grid and an in-memory bucket:
resuming from a checkpoint, waiting for minSites, sampling a fraction of the sites, and failing
the run when fewer than minSites valid updates arrive. Pure logic; the real SuperLink, sites
and S3 are in tests/integration/test_engine.py."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from pollinate_runtime import messages as m
from pollinate_runtime import rounds
from pollinate_runtime.rounds import FederatedRun, RunFailed
from pollinate_runtime.run_config import RunConfig
from pollinate_runtime.store import FederationStore, ObjectStore
from pollinate_runtime.wire import from_record, to_record

pytestmark = pytest.mark.usefixtures("task_identity")


def lora_adapter(seed: int = 0, scale: float = 0.1) -> dict[str, np.ndarray]:
    """A rank-2 adapter of two modules, PEFT names."""
    rng = np.random.default_rng(seed)
    base = "base_model.model.model.layers.0.self_attn"
    return {f"{base}.{module}.lora_{ab}.weight": (rng.standard_normal(shape) * scale).astype(np.float32)
            for module in ("q_proj", "v_proj") for ab, shape in (("A", (2, 8)), ("B", (8, 2)))}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class MemoryObjects(ObjectStore):
    """A bucket in a dict that counts the writes of every key (a versioned bucket's view)."""

    def __init__(self) -> None:
        super().__init__(client=None, bucket="pollinate", prefix="fed")
        self.blobs: dict[str, bytes] = {}
        self.writes: Counter[str] = Counter()

    def put(self, relative: str, data: bytes, *, content_type: str = "", if_absent: bool = False) -> bool:
        if if_absent and relative in self.blobs:
            return False
        self.blobs[relative] = data
        self.writes[relative] += 1
        return True

    def get(self, relative: str, max_bytes: int, what: str = "an object") -> bytes | None:
        return self.blobs.get(relative)  # the caps are ObjectStore's, tested against real S3

    def list(self, relative_prefix: str) -> list[str]:
        return sorted(k for k in self.blobs if k.startswith(relative_prefix))


class ServerKilled(Exception):
    """Stands for the ServerApp process dying."""


class SitesGrid:
    """Honest sites: each answers `train` with the global adapter moved by its own fixed step
    (so the result depends on the strategy's state), `query` with the seeded initial adapter,
    and `evaluate` with an eval loss. `silent` nodes never answer, `nan` nodes send NaNs,
    `oversized` nodes add a megabyte of other arrays to their reply, `kill_at_round` raises
    ServerKilled when that round's messages are pushed, and nodes in `arrive_at` connect only
    once the clock reaches that time (and leave for good at `leave_at`)."""

    def __init__(self, clock: Clock, nodes: list[int], *, silent: tuple[int, ...] = (),
                 nan: tuple[int, ...] = (), oversized: tuple[int, ...] = (), kill_at_round: int | None = None,
                 arrive_at: dict[int, float] | None = None,
                 leave_at: dict[int, float] | None = None,
                 claims: dict[int, object] | None = None,
                 reports: dict[int, dict[str, object]] | None = None) -> None:
        self.clock = clock
        self.claims = claims or {}  # node -> the num-examples it reports instead of its own
        self.reports = reports or {}  # node -> metrics it reports instead of its own, in every reply
        self.nodes = nodes
        self.silent = silent
        self.nan = nan
        self.oversized = oversized
        self.kill_at_round = kill_at_round
        self.arrive_at = arrive_at or {}
        self.leave_at = leave_at or {}
        self.pushed: list[tuple[str, int, int]] = []  # (message type, round, node)
        self.configs: list[tuple[str, int, int, dict]] = []  # (type, round, node, its config)
        self._replies: dict[str, Message] = {}
        self._count = 0

    def get_node_ids(self) -> list[int]:
        self.clock.now += 0.5
        return [n for n in self.nodes
                if self.arrive_at.get(n, 0.0) <= self.clock.now < self.leave_at.get(n, math.inf)]

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            round_ = int(msg.content.config_records[m.CONFIG][m.ROUND])
            if msg.metadata.message_type == "train" and round_ == self.kill_at_round:
                raise ServerKilled(f"killed while sending round {round_}")
            self._count += 1
            mid = f"m{self._count}"
            msg.metadata.__dict__["_message_id"] = mid
            self.pushed.append((msg.metadata.message_type, round_, node))
            self.configs.append((msg.metadata.message_type, round_, node,
                                 dict(msg.content.config_records[m.CONFIG])))
            if node not in self.silent:
                self._replies[mid] = Message(self._answer(msg, node, round_), reply_to=msg)
            ids.append(mid)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        self.clock.now += 1.0
        return [self._replies.pop(mid) for mid in ids if mid in self._replies]

    def _answer(self, msg: Message, node: int, round_: int) -> RecordDict:
        config = ConfigRecord({m.ROUND: round_, m.SITE: f"site-{node}"})
        if msg.metadata.message_type == "query":
            return RecordDict({m.CONFIG: config, m.ARRAYS: to_record(lora_adapter(), "float32")})
        metrics = {m.EVAL_LOSS: 3.0 / (round_ + 1), m.EVAL_EXAMPLES: 10.0}
        if msg.metadata.message_type == "evaluate":
            return RecordDict({m.CONFIG: config, m.METRICS: self._metrics(node, metrics)})
        adapter = from_record(msg.content.array_records[m.ARRAYS])
        step = lora_adapter(seed=node, scale=0.01)
        update = {k: np.asarray(v, np.float32) + step[k] for k, v in adapter.items()}
        if node in self.nan:
            first = sorted(update)[0]
            update[first] = update[first].copy()
            update[first].flat[0] = np.nan
        metrics.update({m.NUM_EXAMPLES: self.claims.get(node, 10.0 * node), m.TRAIN_LOSS: 2.0})
        reply = RecordDict({m.CONFIG: config, m.METRICS: self._metrics(node, metrics),
                            m.ARRAYS: to_record(update, "float16")})
        if node in self.oversized:  # a well-formed adapter, and a megabyte besides
            reply["extra"] = ArrayRecord({"junk": Array(np.zeros(1 << 18, np.float32))})
        return reply

    def _metrics(self, node: int, metrics: dict[str, object]) -> MetricRecord:
        return MetricRecord({**metrics, **self.reports.get(node, {})})


@pytest.fixture(autouse=True)
def no_real_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fake clock advances with every call to the grid; real sleeps would only slow the tests.
    monkeypatch.setattr(rounds.time, "sleep", lambda _: None)


def config(**changes) -> RunConfig:
    values = dict(training_round="notes-v1", lora_rank=2, rounds=4, min_sites=2, round_timeout_seconds=30.0,
                  strategy="fedadam", server_learning_rate=0.1)
    values.update(changes)
    return RunConfig(**values)


def federated_run(grid: SitesGrid, clock: Clock, objects: MemoryObjects, **changes) -> FederatedRun:
    return FederatedRun(grid, config(**changes), FederationStore(objects), poll_seconds=0.0,
                        clock=clock, node_wait_seconds=20.0)


def trained_rounds(grid: SitesGrid) -> list[int]:
    return sorted({r for kind, r, _ in grid.pushed if kind == "train"})


# ---- resuming ------------------------------------------------------------------------------


def test_without_a_checkpoint_a_run_starts_from_round_zero() -> None:
    clock = Clock()
    run = federated_run(SitesGrid(clock, [1, 2, 3]), clock, MemoryObjects())
    assert run.resume() == (0, None)


def unbroken_checkpoint(clock: Clock):
    """The last checkpoint of the same run when nothing goes wrong."""
    objects = MemoryObjects()
    federated_run(SitesGrid(clock, [1, 2, 3]), clock, objects).run()
    checkpoint = FederationStore(objects).load_checkpoint("notes-v1")
    assert checkpoint is not None and checkpoint.round == 4
    return checkpoint


def test_a_restarted_run_resumes_after_its_last_checkpoint_and_ends_where_an_unbroken_one_does() -> None:
    clock = Clock()
    objects = MemoryObjects()
    store = FederationStore(objects)

    # Killed while sending round 3: rounds 1 and 2 are checkpointed.
    first = SitesGrid(clock, [1, 2, 3], kill_at_round=3)
    with pytest.raises(ServerKilled):
        federated_run(first, clock, objects).run()
    assert trained_rounds(first) == [1, 2]
    checkpoint = store.load_checkpoint("notes-v1")
    assert checkpoint is not None and checkpoint.round == 2

    # The restarted server: a fresh FederatedRun on the same bucket.
    second = SitesGrid(clock, [1, 2, 3])
    done, adapter = federated_run(second, clock, objects).resume()
    assert done == 2
    assert adapter is not None and adapter.keys() == checkpoint.adapter.keys()
    for name, values in checkpoint.adapter.items():
        np.testing.assert_array_equal(adapter[name], values)

    restarted = federated_run(second, clock, objects)
    restarted.run()
    # No initial-adapter query, and only the rounds after the checkpoint were trained.
    assert [kind for kind, _, _ in second.pushed].count("query") == 0
    assert trained_rounds(second) == [3, 4]
    # Every round's checkpoint was written once; each round has one metrics entry.
    for round_ in (1, 2, 3, 4):
        manifest = f"checkpoints/notes-v1/round-{round_}/manifest.json"
        assert objects.writes[manifest] == 1, (manifest, objects.writes[manifest])
    assert [e["round"] for e in restarted.metrics] == [0, 1, 2, 3, 4]
    # FedAdam's moments came back too: the resumed run ends exactly where the unbroken one did.
    final = store.load_checkpoint("notes-v1")
    assert final is not None and final.round == 4
    for name, values in unbroken_checkpoint(clock).adapter.items():
        np.testing.assert_allclose(final.adapter[name], values, rtol=0, atol=1e-7)


def test_a_training_round_created_again_under_its_name_runs_anew_and_publishes_a_new_version() -> None:
    clock = Clock()
    objects = MemoryObjects()
    store = FederationStore(objects)
    old_uid, new_uid = "1a2b3c4d-0000-4000-8000-000000000001", "5e6f7a8b-0000-4000-8000-000000000002"
    federated_run(SitesGrid(clock, [1, 2, 3]), clock, objects, training_round_uid=old_uid).run()
    assert store.adapter_versions() == [1]

    # Deleted and created again: same name, another uid. Nothing of the first is resumed or
    # reported; it trains every round and publishes v2, and v1 stays.
    again = SitesGrid(clock, [1, 2, 3])
    run = federated_run(again, clock, objects, training_round_uid=new_uid)
    assert run.resume() == (0, None)
    run.run()
    assert trained_rounds(again) == [1, 2, 3, 4]
    assert store.adapter_versions() == [1, 2]
    progress = store.read_progress("notes-v1-5e6f7a8b")
    assert progress is not None and progress.adapter_version == 2
    assert store.read_progress("notes-v1-1a2b3c4d").adapter_version == 1
    assert store.adapter_manifest(2)["trainingRound"] == "notes-v1-5e6f7a8b"


def test_a_resumed_run_without_its_strategy_state_would_end_elsewhere() -> None:
    """The check above is not vacuous: FedAdam restarted with fresh moments at round 3 ends
    somewhere else than the unbroken run."""
    clock = Clock()
    objects = MemoryObjects()
    with pytest.raises(ServerKilled):
        federated_run(SitesGrid(clock, [1, 2, 3], kill_at_round=3), clock, objects).run()
    store = FederationStore(objects)
    checkpoint = store.load_checkpoint("notes-v1")
    assert checkpoint is not None
    checkpoint.strategy_state = {"step": np.array([0], np.int64)}  # FedAdam as new
    store.save_checkpoint("notes-v1", checkpoint)
    federated_run(SitesGrid(clock, [1, 2, 3]), clock, objects).run()
    final = store.load_checkpoint("notes-v1")
    reference = unbroken_checkpoint(clock)
    assert final is not None
    assert any(not np.allclose(final.adapter[k], v, rtol=0, atol=1e-7) for k, v in reference.adapter.items())


# ---- minSites and sampling -----------------------------------------------------------------


def test_the_first_round_waits_until_min_sites_are_connected() -> None:
    clock = Clock()
    grid = SitesGrid(clock, [1, 2, 3], arrive_at={2: 5.0, 3: 8.0})
    run = federated_run(grid, clock, MemoryObjects(), min_sites=3, rounds=1)
    run.run()
    first_train = min(i for i, (kind, _, _) in enumerate(grid.pushed) if kind == "train")
    assert {node for kind, _, node in grid.pushed[first_train:] if kind == "train"} == {1, 2, 3}
    assert clock.now >= 8.0


def test_too_few_connected_sites_fail_the_run_naming_min_sites_and_the_missing_sites() -> None:
    clock = Clock()
    grid = SitesGrid(clock, [1, 2, 3], arrive_at={3: 1e9})
    run = federated_run(grid, clock, MemoryObjects(), min_sites=3,
                        site_nodes={"site-a": 1, "site-b": 2, "site-c": 3})
    with pytest.raises(RunFailed, match=r"only 2 site\(s\) connected after 20 s; minSites is 3; "
                                        r"not connected: site-c"):
        run.wait_for_nodes(3)


def test_fraction_per_round_samples_min_sites_or_the_fraction_whichever_is_more() -> None:
    clock = Clock()
    nodes = list(range(1, 11))

    def sizes(min_sites: int, fraction: float) -> int:
        run = federated_run(SitesGrid(clock, nodes), clock, MemoryObjects(), min_sites=min_sites,
                            fraction_per_round=fraction)
        return len(run.sample(nodes))

    assert sizes(2, 0.25) == math.ceil(0.25 * 10) == 3
    assert sizes(5, 0.25) == 5
    assert sizes(1, 0.01) == 1
    assert sizes(2, 1.0) == 10


def test_sampling_is_deterministic_for_a_training_round_and_differs_between_rounds() -> None:
    clock = Clock()
    nodes = list(range(1, 21))

    def samples(name: str) -> list[list[int]]:
        run = federated_run(SitesGrid(clock, nodes), clock, MemoryObjects(), training_round=name,
                            min_sites=2, fraction_per_round=0.3)
        return [run.sample(nodes) for _ in range(5)]

    picked = samples("notes-v1")
    assert picked == samples("notes-v1")  # a restarted server draws the same sites
    assert all(len(s) == 6 and s == sorted(s) and set(s) <= set(nodes) for s in picked)
    assert len({tuple(s) for s in picked}) > 1  # not the same sites every round
    assert picked != samples("notes-v2")


def test_a_sampled_round_sends_the_adapter_only_to_the_sampled_sites() -> None:
    clock = Clock()
    grid = SitesGrid(clock, list(range(1, 11)))
    run = federated_run(grid, clock, MemoryObjects(), rounds=2, min_sites=2, fraction_per_round=0.3)
    run.run()
    for round_ in (1, 2):
        assert len({n for kind, r, n in grid.pushed if kind == "train" and r == round_}) == 3
    assert all(e["participants"] == 3 for e in run.metrics if e["round"] > 0)


def test_fewer_valid_updates_than_min_sites_fail_the_run_naming_min_sites_and_the_sites() -> None:
    clock = Clock()
    objects = MemoryObjects()
    grid = SitesGrid(clock, [1, 2, 3], silent=(3,), nan=(2,))
    run = federated_run(grid, clock, objects, min_sites=2, round_timeout_seconds=10.0,
                        site_nodes={"site-a": 1, "site-b": 2, "site-c": 3})
    with pytest.raises(RunFailed) as failed:
        run.run()
    message = str(failed.value)
    assert message.startswith("round 1: only 1 valid update(s) (site-a), minSites is 2"), message
    assert "no reply from site-c" in message
    assert "rejected: site-b (NonFiniteValues" in message
    progress = FederationStore(objects).read_progress("notes-v1")
    assert progress is not None and progress.phase == "Failed" and progress.message == message
    assert progress.sites["site-c"]["state"] == "NoReply"
    assert progress.sites["site-b"]["state"] == "Rejected"


def test_a_reply_carrying_more_bytes_than_an_update_can_is_rejected_and_attributed() -> None:
    clock = Clock()
    grid = SitesGrid(clock, [1, 2, 3], oversized=(3,))
    run = federated_run(grid, clock, MemoryObjects(), rounds=2,
                        site_nodes={"site-a": 1, "site-b": 2, "site-c": 3})
    run.run()
    for entry in (e for e in run.metrics if e["round"] > 0):
        assert entry["participants"] == 2
        [rejected] = entry["rejected"]
        assert rejected["site"] == "site-c" and rejected["reason"].startswith("OversizedUpdate: "), rejected


def test_sites_gone_before_a_round_below_min_sites_fail_the_run_naming_the_sites_that_left() -> None:
    """Without registered site nodes the server knows the sites by their earlier replies."""
    clock = Clock()
    grid = SitesGrid(clock, [1, 2, 3], leave_at={2: 5.0, 3: 5.0})
    run = federated_run(grid, clock, MemoryObjects(), min_sites=2)
    with pytest.raises(RunFailed, match=r"only 1 site\(s\) connected after 20 s; minSites is 2; "
                                        r"not connected: site-2, site-3"):
        run.run()
    assert 1 in trained_rounds(grid)


# ---- example counts --------------------------------------------------------------------------

HOSTILE_CLAIMS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "-1": -1.0, "0": 0.0,
                  "half": 2.5, "list": [1, 2], "int-list": [10**9]}


@pytest.mark.parametrize("claim", HOSTILE_CLAIMS.values(), ids=HOSTILE_CLAIMS.keys())
def test_an_invalid_example_count_is_rejected_and_named_and_the_run_goes_on(claim: object) -> None:
    clock = Clock()
    grid = SitesGrid(clock, [1, 2, 3, 4], claims={4: claim})
    run = federated_run(grid, clock, MemoryObjects(), rounds=2, strategy="fedavg",
                        site_nodes={"site-a": 1, "site-b": 2, "site-c": 3, "site-d": 4})
    run.run()
    for entry in (e for e in run.metrics if e["round"] > 0):
        assert set(entry["examples"]) == {"site-a", "site-b", "site-c"}
        [rejected] = entry["rejected"]
        assert rejected["site"] == "site-d" and rejected["reason"].startswith("InvalidExampleCount: ")


def final_adapter(claims: dict[int, object], nodes: list[int], **changes) -> dict[str, np.ndarray]:
    clock = Clock()
    objects = MemoryObjects()
    grid = SitesGrid(clock, nodes, claims=claims)
    run = federated_run(grid, clock, objects, rounds=2, strategy="fedavg", **changes)
    run.run()
    checkpoint = FederationStore(objects).load_checkpoint("notes-v1")
    assert checkpoint is not None and checkpoint.round == 2
    return dict(checkpoint.adapter)


@pytest.mark.parametrize("claim", [1e9, 1e300, 10**18])
def test_a_huge_example_count_is_capped_at_max_examples_per_site_and_reported(claim: float) -> None:
    clock = Clock()
    grid = SitesGrid(clock, [1, 2, 3, 4], claims={4: claim})
    run = federated_run(grid, clock, MemoryObjects(), rounds=2, strategy="fedavg",
                        max_examples_per_site=40,
                        site_nodes={"site-a": 1, "site-b": 2, "site-c": 3, "site-d": 4})
    run.run()
    for entry in (e for e in run.metrics if e["round"] > 0):
        assert entry["examples"] == {"site-a": 10, "site-b": 20, "site-c": 30, "site-d": 40}
        assert entry["cappedExamples"] == {"site-d": f"{claim:.6g}"}
        assert not entry["rejected"]
    assert "counted as maxExamplesPerSite 40" in run.site_states["site-d"]["message"]
    # Capped, the site weighs exactly what an honest site reporting 40 does.
    honest = final_adapter({4: 40.0}, [1, 2, 3, 4], max_examples_per_site=40)
    hostile = final_adapter({4: claim}, [1, 2, 3, 4], max_examples_per_site=40)
    assert all(np.array_equal(honest[k], hostile[k]) for k in honest)


# ---- evaluations and reported losses ----------------------------------------------------------


def rejected_replies(reason: str, site: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("pollinate_server_rejected_replies_total",
                                     {"reason": reason, "site": site}) or 0.0


SITES = {"site-a": 1, "site-b": 2, "site-c": 3, "site-d": 4}


@pytest.mark.parametrize("report", [
    {m.EVAL_LOSS: math.nan}, {m.EVAL_LOSS: math.inf}, {m.EVAL_LOSS: -1.0}, {m.EVAL_LOSS: 1e300},
    {m.EVAL_LOSS: [0.0, 1.0]}, {m.EVAL_EXAMPLES: math.nan}, {m.EVAL_EXAMPLES: 0.0},
    {m.EVAL_EXAMPLES: -5}, {m.GENERAL_LOSS: math.inf},
], ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items()))
def test_a_hostile_evaluation_is_refused_named_and_counted_and_the_perplexity_stays_honest(
        report: dict[str, object]) -> None:
    import json

    clock = Clock()
    before = rejected_replies("InvalidMetric", "site-d") + rejected_replies("InvalidExampleCount", "site-d")
    run = federated_run(SitesGrid(clock, [1, 2, 3, 4], reports={4: report}), clock, MemoryObjects(),
                        rounds=2, strategy="fedavg", site_nodes=SITES)
    run.run()
    json.dumps(run.metrics, allow_nan=False)  # what the status holds stays JSON
    honest = federated_run(SitesGrid(clock, [1, 2, 3]), clock, MemoryObjects(), rounds=2,
                           strategy="fedavg", site_nodes={s: n for s, n in SITES.items() if n < 4})
    honest.run()
    assert [e["perplexity"] for e in run.metrics] == [e["perplexity"] for e in honest.metrics]
    for entry in run.metrics:
        assert set(entry["sitePerplexity"]) == {"site-a", "site-b", "site-c"}
        [refused] = entry["evalRejected"]
        assert refused["site"] == "site-d"
        assert refused["reason"].startswith(("InvalidMetric: ", "InvalidExampleCount: "))
        assert f"{next(iter(report))} is " in refused["reason"]
    for entry in (e for e in run.metrics if e["round"] > 0):
        assert entry["participants"] == 4  # its update is judged on its own
    after = rejected_replies("InvalidMetric", "site-d") + rejected_replies("InvalidExampleCount", "site-d")
    assert after - before == 3  # rounds 0, 1 and 2 evaluated


def test_an_evaluation_claiming_a_huge_count_weighs_as_max_examples_per_site() -> None:
    clock = Clock()
    grid = SitesGrid(clock, [1, 2, 3, 4], reports={4: {m.EVAL_LOSS: 0.0, m.EVAL_EXAMPLES: 1e300}})
    run = federated_run(grid, clock, MemoryObjects(), rounds=1, strategy="fedavg",
                        max_examples_per_site=20, site_nodes=SITES)
    run.run()
    # Three honest sites of 10 held-out examples at loss 1.5 (SitesGrid: 3 / (round + 1), sent
    # in round 1), one of "1e300" at loss 0: counted as 20.
    assert [e["evalLoss"] for e in run.metrics] == pytest.approx([1.5 * 30 / 50] * 2)


@pytest.mark.parametrize("loss", [math.nan, -0.5, 5e3, [1.0]])
def test_a_train_loss_that_is_no_loss_rejects_the_update_and_names_the_site(loss: object) -> None:
    clock = Clock()
    run = federated_run(SitesGrid(clock, [1, 2, 3, 4], reports={4: {m.TRAIN_LOSS: loss}}), clock,
                        MemoryObjects(), rounds=1, strategy="fedavg", site_nodes=SITES)
    run.run()
    entry = next(e for e in run.metrics if e["round"] == 1)
    assert entry["participants"] == 3 and entry["trainLoss"] == pytest.approx(2.0)
    [rejected] = entry["rejected"]
    assert rejected["site"] == "site-d"
    assert rejected["reason"].startswith("InvalidMetric: train-loss is ")


def test_a_refused_site_is_told_why_in_its_next_message_once() -> None:
    clock = Clock()
    grid = SitesGrid(clock, [1, 2, 3, 4], nan=(4,))
    federated_run(grid, clock, MemoryObjects(), rounds=2, strategy="fedavg", site_nodes=SITES).run()
    told = {(kind, round_): config.get(m.REFUSED) for kind, round_, node, config in grid.configs if node == 4}
    assert told[("train", 1)] is None
    assert told[("train", 2)].startswith("round 1: NonFiniteValues: ")
    assert told[("evaluate", 2)].startswith("round 2: NonFiniteValues: ")
    assert all(config.get(m.REFUSED) is None for _, _, node, config in grid.configs if node != 4)
