"""The server's round loop: sample sites, send the global adapter, fold replies in as they
arrive, checkpoint, report progress, publish the adapter version at the end.

Why not Flower's `Strategy.start`: it collects every reply of a round before aggregating
(O(sites x parameters) in memory) and its `send_and_receive` sleeps 3 s between pulls. Here
each reply is validated and folded into an fp32 accumulator the moment it is pulled, then
dropped, and the loop polls every `poll_seconds` after a reply, doubling the wait while none
comes up to `MAX_POLL_SECONDS` (each pull costs the SuperLink CPU: at 0.1 s a round of several
minutes is thousands of pulls, at 0.4 s a reply waits 0.2 s more on average). The
aggregation rules themselves are small composable classes (`aggregation`, `privacy`), in the
spirit of Flower's Message-API strategies.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from . import messages as m
from .aggregation import Aggregator, make_aggregator
from .privacy import CentralDP, PrivateAggregator
from .run_config import RunConfig
from .server_metrics import CAPPED_EXAMPLE_COUNTS, SITE_LABEL_MAX, count_rejection
from .store import Checkpoint, CorruptObject, FederationStore, RunProgress, lora_adapter_config
from .wire import (
    AdapterSpec,
    AdapterState,
    RejectReason,
    UpdateRejected,
    check_update_size,
    example_weight,
    from_record,
    payload_bytes,
    reported_loss,
    to_record,
    validate_update,
)

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """The run cannot go on; the message says why, for the TrainingRound's status."""


class Grid(Protocol):
    def get_node_ids(self) -> Iterable[int]: ...
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]: ...
    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]: ...


@dataclass
class Reply:
    node_id: int
    site: str
    message: Message


@dataclass(frozen=True)
class SiteEval:
    """A site's evaluation of a global adapter on its own held-out data."""

    site: str
    loss: float
    examples: float
    general_loss: float | None


def site_eval(site: str, metrics: MetricRecord, max_examples: int) -> SiteEval | None:
    """A site's evaluation from its reply's metrics (None: it evaluated nothing). Its losses
    and example count pass the same bounds as a training reply's: a hostile site must not
    turn the round's perplexity into NaN or outweigh the others' held-out data."""
    if m.EVAL_LOSS not in metrics:
        return None
    loss = reported_loss(m.EVAL_LOSS, metrics[m.EVAL_LOSS])
    general = (reported_loss(m.GENERAL_LOSS, metrics[m.GENERAL_LOSS])
               if m.GENERAL_LOSS in metrics else None)
    examples, _ = example_weight(metrics.get(m.EVAL_EXAMPLES, 1), max_examples, m.EVAL_EXAMPLES)
    return SiteEval(site, loss, float(examples), general)


def refusal(site: str, err: UpdateRejected, what: str) -> dict[str, str]:
    """A refused reply as the round's report names it; logged and counted (server_metrics)."""
    log.warning("refused %s of site %s: %s", what, site, err)
    count_rejection(err.reason, site)
    return {"site": site, "reason": str(err)[:300]}


@dataclass
class Evaluations:
    """The sites' evaluations of one global adapter, and the ones refused (named, with why)."""

    max_examples: int
    accepted: list[SiteEval] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)

    def take(self, site: str, metrics: MetricRecord) -> None:
        try:
            evaluation = site_eval(site, metrics, self.max_examples)
        except UpdateRejected as err:
            self.rejected.append(refusal(site, err, "the evaluation"))
            return
        if evaluation is not None:
            self.accepted.append(evaluation)


@dataclass
class Exchange:
    # Replies are not kept: each goes to on_reply and is dropped, so the server never holds a
    # whole round of updates.
    failed: dict[int, str] = field(default_factory=dict)  # node id -> why
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class RoundOutcome:
    round: int
    participants: int
    train_loss: float | None
    seconds: float
    bytes_sent: int
    bytes_received: int
    rejected: list[dict[str, str]]
    epsilon: float | None
    examples: dict[str, int]
    site_train_loss: dict[str, float]
    # Sites whose claimed example count was above maxExamplesPerSite: site -> the claim.
    capped_examples: dict[str, str] = field(default_factory=dict)


# Errors the SuperLink itself returns when a message could not reach its node.
UNDELIVERED = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE)
# A message sent this close to the round's deadline would expire before a site could answer
# (and the SuperLink refuses one already expired when it arrives).
RESEND_MIN_SECONDS = 10.0
MAX_POLL_SECONDS = 0.4


def _said(rejection: dict[str, str]) -> str:
    """A rejected site with the start of its reason, for a one-line failure message."""
    reason = rejection["reason"]
    return f"{rejection['site']} ({reason[:160]}{'...' if len(reason) > 160 else ''})"


def _weighted(values: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in values)
    if total <= 0:
        return None
    return sum(v * w for v, w in values) / total


def _perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 50.0))


class FederatedRun:
    def __init__(self, grid: Grid, config: RunConfig, store: FederationStore, *,
                 poll_seconds: float = 0.1, clock: Callable[[], float] = time.monotonic,
                 node_wait_seconds: float | None = None) -> None:
        self.grid = grid
        self.config = config
        self.store = store
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.node_wait_seconds = node_wait_seconds or max(60.0, config.round_timeout_seconds)
        self.sites_by_node: dict[int, str] = {node: site for site, node in config.site_nodes.items()}
        self.metrics: list[dict[str, Any]] = []
        self.site_states: dict[str, dict[str, Any]] = {}
        # Site -> why the server refused its last reply, told to it with its next message.
        self.refusals: dict[str, str] = {}
        self._spill = tempfile.TemporaryDirectory(prefix="pollinate-spill-")
        self.aggregator = self._make_aggregator()
        self.rng = random.Random(config.run_key)

    def _make_aggregator(self) -> Aggregator:
        c = self.config
        inner = make_aggregator(
            c.strategy, beta=c.trim_beta, server_learning_rate=c.server_learning_rate,
            beta_1=c.adam_beta1, beta_2=c.adam_beta2, tau=c.adam_tau, spill_dir=self._spill.name)
        if c.clipping_norm > 0:
            population = max(len(c.sites), c.min_sites)
            return PrivateAggregator(inner, CentralDP(
                clipping_norm=c.clipping_norm, noise_multiplier=c.noise_multiplier,
                population_size=population, target_delta=c.target_delta))
        return inner

    # ---- Flower message exchange -------------------------------------------------------
    def wait_for_nodes(self, count: int) -> list[int]:
        deadline = self.clock() + self.node_wait_seconds
        while True:
            nodes = sorted(n for n in self.grid.get_node_ids()
                           if not self.config.site_nodes or n in self.sites_by_node)
            if len(nodes) >= count:
                return nodes
            if self.clock() >= deadline:
                # The run's registered sites, or (without them) every site that answered before.
                missing = sorted(s for n, s in self.sites_by_node.items() if n not in nodes)
                raise RunFailed(
                    f"only {len(nodes)} site(s) connected after {self.node_wait_seconds:.0f} s; "
                    f"minSites is {count}" + (f"; not connected: {', '.join(missing)}" if missing else ""))
            time.sleep(0.5)

    def exchange(self, nodes: list[int], message_type: str, content: Callable[[int], RecordDict],
                 round: int, on_reply: Callable[[Reply], None]) -> Exchange:
        """Send one message per node and hand each reply to `on_reply` as it arrives; return
        when every node answered or the round timeout passed (closing with what arrived).

        A node the SuperLink reports offline (no heartbeat: its site restarted, or a site
        that just left still counted as online when the round began) is sent the message
        again when it is back online before the deadline: a site that restarts mid-round
        rejoins the round instead of being lost to it. Not in the last `RESEND_MIN_SECONDS`
        (the message would expire on its way), and a resend the SuperLink refuses leaves the
        site waited for, not the run failed."""
        out = Exchange()
        timeout = self.config.round_timeout_seconds
        deadline = self.clock() + timeout

        def send(targets: list[int]) -> dict[str, int]:
            ttl = max(1.0, deadline - self.clock())
            outgoing = [Message(content(node), dst_node_id=node, message_type=message_type,
                                ttl=ttl, group_id=str(round)) for node in targets]
            size = sum(payload_bytes(r) for msg in outgoing for r in msg.content.array_records.values())
            ids = list(self.grid.push_messages(outgoing))
            out.bytes_sent += size
            return {mid: node for mid, node in zip(ids, targets, strict=True) if mid}

        pending = send(nodes)
        away: dict[int, str] = {}  # node -> why it is waited for
        wait = self.poll_seconds
        while (pending or away) and self.clock() < deadline:
            replies = list(self.grid.pull_messages(list(pending))) if pending else []
            # Replies come in bursts (sites of one size finish together): poll fast after one.
            wait = self.poll_seconds if replies else min(max(self.poll_seconds, MAX_POLL_SECONDS), 2 * wait)
            for reply in replies:
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                if reply.has_error():
                    why = f"{reply.error.code}: {reply.error.reason}"
                    if reply.error.code in UNDELIVERED:
                        away[node] = why
                        log.info("round %d: site %s %s; waiting for it to come back",
                                 round, self.sites_by_node.get(node, f"node-{node}"),
                                 "is offline" if reply.error.code == ErrorCode.NODE_UNAVAILABLE
                                 else "did not take its message in time")
                    else:
                        out.failed[node] = why
                    continue
                config = reply.content.config_records.get(m.CONFIG, {})
                if self.config.site_nodes:  # the name its authenticated key was registered under
                    site = self.sites_by_node[node]
                else:
                    site = str(config.get(m.SITE, f"node-{node}"))
                    self.sites_by_node[node] = site
                if m.ERROR in config:
                    out.failed[node] = f"site error: {config[m.ERROR]}"
                    continue
                out.bytes_received += sum(payload_bytes(r) for r in reply.content.array_records.values())
                on_reply(Reply(node, site, reply))
            if away:
                online = set(self.grid.get_node_ids())
                back = sorted(n for n in away if n in online)
                if back and deadline - self.clock() >= RESEND_MIN_SECONDS:
                    names = ", ".join(self.sites_by_node.get(n, f"node-{n}") for n in back)
                    log.info("round %d: %s back online; sending the round again", round, names)
                    try:
                        pending.update(send(back))
                    except (httpx.HTTPError, ValueError) as err:
                        # The SuperLink is busy or going down: the next pass tries again.
                        log.warning("round %d: could not send the round again to %s: %s",
                                    round, names, err)
                    else:
                        for node in back:
                            del away[node]
            if pending or away:
                time.sleep(wait)
        for node in pending.values():
            out.failed[node] = f"no reply within {timeout:.0f} s"
        for node, why in away.items():
            out.failed[node] = f"no reply within {timeout:.0f} s (offline: {why})"
        return out

    # ---- phases ------------------------------------------------------------------------
    def initial_adapter(self) -> AdapterState:
        """The seeded starting adapter, from the sites (the server holds no model). Every
        honest site makes the same one, so every connected site is asked and the answer most
        of them agree on wins: a misbehaving minority cannot choose it. Replies are reduced to
        one copy per distinct answer as they arrive, so memory stays O(parameters)."""
        if self.config.initial_adapter_version:
            version = int(self.config.initial_adapter_version.lstrip("v"))
            log.info("starting from published adapter v%d", version)
            return self.store.load_adapter(version).adapter
        nodes = self.wait_for_nodes(1)
        candidates: dict[str, tuple[int, AdapterState]] = {}

        def take(reply: Reply) -> None:
            record = reply.message.content.array_records.get(m.ARRAYS)
            if record is None:
                log.warning("site %s sent no initial adapter", reply.site)
                return
            try:
                adapter = {k: np.array(v, dtype=np.float32) for k, v in from_record(record).items()}
            except UpdateRejected as err:
                log.warning("site %s sent a malformed initial adapter: %s", reply.site, err)
                return
            if not adapter or not all(np.isfinite(v).all() for v in adapter.values()):
                log.warning("site %s sent an unusable initial adapter", reply.site)
                return
            digest = hashlib.sha256(b"".join(
                k.encode() + v.tobytes() for k, v in sorted(adapter.items()))).hexdigest()
            count, _ = candidates.get(digest, (0, adapter))
            candidates[digest] = (count + 1, adapter)

        self.exchange(nodes, "query", lambda _: RecordDict(
            {m.CONFIG: ConfigRecord({m.ROUND: 0})}), 0, take)
        if not candidates:
            raise RunFailed("no site answered the request for the initial adapter")
        return max(candidates.values(), key=lambda c: c[0])[1]

    def sample(self, nodes: list[int]) -> list[int]:
        wanted = max(self.config.min_sites, math.ceil(self.config.fraction_per_round * len(nodes)))
        if wanted >= len(nodes):
            return nodes
        return sorted(self.rng.sample(nodes, wanted))

    def train_round(self, round: int, global_adapter: AdapterState,
                    spec: AdapterSpec) -> tuple[AdapterState, RoundOutcome, Evaluations]:
        """One round of training; returns the new global adapter, what happened, and the
        sites' evaluations of the adapter they received (the previous round's result)."""
        start = self.clock()
        nodes = self.sample(self.wait_for_nodes(self.config.min_sites))
        record = to_record(global_adapter, self.config.transport_dtype)
        round_mean = self.aggregator.begin_round(global_adapter)
        accepted: dict[str, int] = {}
        capped: dict[str, str] = {}  # site -> the count it claimed
        rejected: list[dict[str, str]] = []
        losses: list[tuple[float, float]] = []
        site_losses: dict[str, float] = {}
        evals = Evaluations(self.config.max_examples_per_site)

        def fold(reply: Reply) -> None:
            content = reply.message.content
            metrics = content.metric_records.get(m.METRICS, MetricRecord())
            reported = content.config_records.get(m.CONFIG, {}).get(m.ROUND)
            evals.take(reply.site, metrics)
            try:
                if m.ARRAYS not in content.array_records:
                    raise UpdateRejected(RejectReason.EMPTY, "the reply carries no adapter")
                claimed = metrics.get(m.NUM_EXAMPLES)
                examples, was_capped = example_weight(claimed, self.config.max_examples_per_site)
                train_loss = (reported_loss(m.TRAIN_LOSS, metrics[m.TRAIN_LOSS])
                              if m.TRAIN_LOSS in metrics else None)
                # Every array the reply carries counts, not only the adapter's.
                check_update_size(sum(payload_bytes(r) for r in content.array_records.values()), spec)
                update = validate_update(content.array_records[m.ARRAYS], spec,
                                         max_norm=self.config.max_update_norm,
                                         expected_round=round,
                                         reported_round=int(reported) if reported is not None else None)
            except UpdateRejected as err:
                rejected.append(refusal(reply.site, err, f"round {round}'s update"))
                self.site_states[reply.site] = {"state": "Rejected", "lastRound": round,
                                                "message": str(err)[:300]}
                self.refusals[reply.site] = f"round {round}: {str(err)[:300]}"
                return
            round_mean.add(update, weight=examples)
            accepted[reply.site] = examples
            if train_loss is not None:
                losses.append((train_loss, examples))
                site_losses[reply.site] = train_loss
            self.site_states[reply.site] = {"state": "Trained", "lastRound": round}
            if was_capped:
                capped[reply.site] = f"{claimed:.6g}"
                message = (f"reported {claimed:.6g} examples, counted as "
                           f"maxExamplesPerSite {examples}")
                self.site_states[reply.site]["message"] = message
                log.warning("round %d: site %s %s", round, reply.site, message)
                CAPPED_EXAMPLE_COUNTS.labels(reply.site[:SITE_LABEL_MAX]).inc()

        def content(node: int) -> RecordDict:
            return RecordDict({m.ARRAYS: record, m.CONFIG: self._config_for(node, round)})

        exchange = self.exchange(nodes, "train", content, round, fold)
        silent: list[str] = []
        for node, why in exchange.failed.items():
            site = self.sites_by_node.get(node, f"node-{node}")
            self.site_states[site] = {"state": "NoReply", "lastRound": round, "message": why}
            if why.startswith("no reply"):
                silent.append(site)
            else:  # the site answered with an error instead
                rejected.append({"site": site, "reason": f"SiteError: {why}"[:300]})
            log.warning("round %d: site %s did not reply: %s", round, site, why)
        if len(accepted) < self.config.min_sites:
            round_mean.close()
            raise RunFailed(
                f"round {round}: only {len(accepted)} valid update(s) ({', '.join(accepted) or 'none'}), "
                f"minSites is {self.config.min_sites}; no reply from "
                f"{', '.join(silent) or 'none'}; "
                f"rejected: {'; '.join(_said(r) for r in rejected) or 'none'}")
        new_global = self.aggregator.finish_round(round_mean)
        report = getattr(self.aggregator, "last_report", None)
        outcome = RoundOutcome(
            round=round, participants=len(accepted), train_loss=_weighted(losses),
            seconds=self.clock() - start, bytes_sent=exchange.bytes_sent,
            bytes_received=exchange.bytes_received, rejected=rejected,
            epsilon=report.epsilon if report and math.isfinite(report.epsilon) else None,
            examples=accepted, site_train_loss=site_losses, capped_examples=capped)
        return new_global, outcome, evals

    def evaluate(self, round: int, global_adapter: AdapterState) -> Evaluations:
        nodes = self.wait_for_nodes(self.config.min_sites)
        record = to_record(global_adapter, self.config.transport_dtype)
        evals = Evaluations(self.config.max_examples_per_site)

        def take(reply: Reply) -> None:
            evals.take(reply.site, reply.message.content.metric_records.get(m.METRICS, MetricRecord()))

        self.exchange(nodes, "evaluate", lambda node: RecordDict(
            {m.ARRAYS: record, m.CONFIG: self._config_for(node, round)}), round, take)
        return evals

    def _config_for(self, node: int, round: int) -> ConfigRecord:
        """The round, and for a site whose last reply was refused, the server's word on why
        (sent once)."""
        config = ConfigRecord({m.ROUND: round})
        site = self.sites_by_node.get(node)
        if site is not None and (refused := self.refusals.pop(site, None)):
            config[m.REFUSED] = refused
        return config

    # ---- bookkeeping -------------------------------------------------------------------
    def _record_eval(self, round: int, evals: Evaluations) -> None:
        """Evaluations of the adapter produced by `round` (round 0: the starting adapter)."""
        if not evals.accepted and not evals.rejected:
            return
        entry = self._metrics_entry(round)
        if evals.rejected:
            entry["evalRejected"] = evals.rejected
            for refused in evals.rejected:
                self.refusals.setdefault(
                    refused["site"], f"your evaluation of round {round}'s adapter: {refused['reason']}")
        if not evals.accepted:
            return
        accepted = evals.accepted
        loss = _weighted([(e.loss, e.examples) for e in accepted])
        general = _weighted([(e.general_loss, e.examples) for e in accepted if e.general_loss is not None])
        entry.update({"evalLoss": loss, "perplexity": _perplexity(loss),
                      "generalPerplexity": _perplexity(general),
                      "sitePerplexity": {e.site: _perplexity(e.loss) for e in accepted}})

    def _metrics_entry(self, round: int) -> dict[str, Any]:
        for entry in self.metrics:
            if entry["round"] == round:
                return entry
        entry = {"round": round}
        self.metrics.append(entry)
        self.metrics.sort(key=lambda e: e["round"])
        return entry

    def _record_outcome(self, o: RoundOutcome) -> None:
        entry = self._metrics_entry(o.round)
        entry.update({
            "participants": o.participants, "trainLoss": o.train_loss, "seconds": round(o.seconds, 3),
            "bytesSent": o.bytes_sent, "bytesReceived": o.bytes_received, "rejected": o.rejected,
            "examples": o.examples, "siteTrainLoss": o.site_train_loss,
        })
        if o.capped_examples:
            entry["cappedExamples"] = o.capped_examples
        if o.epsilon is not None:
            entry["epsilon"] = o.epsilon

    def status_metrics(self) -> list[dict[str, Any]]:
        """Per-round metrics for progress.json: the TrainingRound status fields, plus per-site
        detail (sitePerplexity, siteTrainLoss, examples) that the operator leaves in S3."""
        return [{k: v for k, v in e.items() if v is not None} for e in self.metrics]

    def write_progress(self, round: int, phase: str = "Running", adapter_version: int | None = None,
                       last_checkpoint: str | None = None, message: str = "") -> None:
        self.store.write_progress(RunProgress(
            training_round=self.config.run_key, round=round, total_rounds=self.config.rounds,
            phase=phase, rounds=self.status_metrics(), sites=self.site_states,
            last_checkpoint=last_checkpoint, adapter_version=adapter_version, message=message))

    def checkpoint(self, round: int, adapter: AdapterState) -> str:
        privacy = getattr(self.aggregator, "privacy", None)
        pointer = self.store.save_checkpoint(self.config.run_key, Checkpoint(
            round=round, adapter=adapter, strategy_state=self.aggregator.state_dict(),
            privacy_state=privacy.state_dict() if privacy else None,
            metrics=self.metrics,
            server_state={"sites_by_node": {str(k): v for k, v in self.sites_by_node.items()}}))
        return pointer.manifest_key

    def resume(self) -> tuple[int, AdapterState | None]:
        checkpoint = self.store.load_checkpoint(self.config.run_key)
        if checkpoint is None:
            return 0, None
        self.aggregator.load_state_dict(checkpoint.strategy_state)
        privacy = getattr(self.aggregator, "privacy", None)
        if privacy and checkpoint.privacy_state:
            privacy.load_state_dict(checkpoint.privacy_state)
        self.metrics = list(checkpoint.metrics)
        log.info("resuming %s after round %d from its checkpoint",
                 self.config.run_key, checkpoint.round)
        return checkpoint.round, checkpoint.adapter

    def _published_version(self) -> int | None:
        """A version this training round already published (a restart after publishing)."""
        # Only the small manifests are read: loading each version's weights to learn who
        # published it would move every adapter ever published at the end of every run.
        for version in sorted(self.store.adapter_versions(), reverse=True):
            try:
                manifest = self.store.adapter_manifest(version)
            except CorruptObject as err:  # someone else's broken version must not stop this run
                log.warning("skipping adapter version v%d: %s", version, err)
                continue
            if manifest and manifest.get("trainingRound") == self.config.run_key:
                return version
        return None

    # ---- the whole run -----------------------------------------------------------------
    def run(self) -> int:
        c = self.config
        try:
            done, adapter = self.resume()
            if adapter is None:
                adapter = self.initial_adapter()
                self.write_progress(0, message="starting")
            spec = AdapterSpec.from_template(adapter)
            last_checkpoint = None
            for round in range(done + 1, c.rounds + 1):
                adapter_before = adapter
                adapter, outcome, evals = self.train_round(round, adapter_before, spec)
                self._record_eval(round - 1, evals)
                self._record_outcome(outcome)
                last_checkpoint = self.checkpoint(round, adapter)
                self.write_progress(round, last_checkpoint=last_checkpoint)
                log.info("round %d/%d: %d sites, train loss %s, %.1f s", round, c.rounds,
                         outcome.participants, outcome.train_loss, outcome.seconds)
            self._record_eval(c.rounds, self.evaluate(c.rounds, adapter))
            version = self._published_version() or self.publish(adapter)
            self.write_progress(c.rounds, phase="Succeeded", adapter_version=version,
                                last_checkpoint=last_checkpoint,
                                message=f"published adapter v{version}")
            return version
        except RunFailed as err:
            self.write_progress(max((e["round"] for e in self.metrics), default=0), phase="Failed",
                                message=str(err))
            raise
        finally:
            self._spill.cleanup()

    def publish(self, adapter: AdapterState) -> int:
        c = self.config
        examples: dict[str, int] = {}
        for entry in self.metrics:
            for site, n in (entry.get("examples") or {}).items():
                examples[site] = examples.get(site, 0) + int(n)
        config = lora_adapter_config(
            c.base_model, rank=c.lora_rank, alpha=c.lora_alpha, dropout=c.lora_dropout,
            target_modules=list(c.lora_target_modules), revision=c.base_model_revision)
        parent = int(c.initial_adapter_version.lstrip("v")) if c.initial_adapter_version else None
        published = self.store.publish_adapter(
            adapter, config, training_round=c.run_key, round=c.rounds, sites=examples,
            metrics={"rounds": self.status_metrics()}, parent_version=parent)
        log.info("published adapter v%d", published.version)
        return published.version
