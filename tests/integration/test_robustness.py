"""Robust aggregation against a poisoning site, with real processes: one SuperLink, four
honest non-IID sites running the real trainer on the tiny Llama, and a fifth registered site
whose updates are poisoned (tests/support/hostile_site.py, kind "poison": every coordinate
pulled 0.5 in one direction, inside the norm bound, so validation lets it through).

The clean run is FedAvg over the four honest sites only (the run names their nodes); the
same sites plus the poisoner then run with FedAvg (the attack must bite, or this test proves
nothing), trimmed mean and the coordinate-wise median."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from flower_processes import FlowerServer, Site
from pollinate_runtime.run_config import RunConfig
from pollinate_runtime.store import FederationStore
from pollinate_testbed import Testbed
from pollinate_testbed.testing import eventually
from tiny_lm import docstring_corpus

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(2400)]

HONEST = {
    "site-a": ("pathlib", "shutil", "os"),
    "site-b": ("datetime", "calendar", "time"),
    "site-c": ("re", "string", "difflib"),
    "site-d": ("json", "csv", "textwrap"),
}
PREFIX = "robustness-tests"


@pytest.fixture(scope="module")
def federation(testbed: Testbed, tmp_path_factory) -> Iterator[tuple[FlowerServer, dict[str, int]]]:
    """The server with four honest sites and the poisoner joined; yields it and every site's
    node id."""
    root = tmp_path_factory.mktemp("robustness")
    s3 = testbed.s3()
    server = FlowerServer(root / "superlink",
                          env={"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key})
    server.start()
    nodes: dict[str, int] = {}
    sites: list[Site] = []
    poisoner: subprocess.Popen | None = None
    try:
        for name, modules in HONEST.items():
            data = root / "data" / name
            data.mkdir(parents=True)
            (data / "notes.txt").write_text("\n\n".join(docstring_corpus(modules)) + "\n")
            key, node = server.register(name, root / "keys")
            nodes[name] = int(node)
            site = Site(name, data, root / name, key)
            site.join(server)
            sites.append(site)
        key, node = server.register("mallory", root / "keys")
        nodes["mallory"] = int(node)
        log = open(root / "mallory.log", "wb")  # noqa: SIM115 - handed to the child
        poisoner = subprocess.Popen(
            [sys.executable, "-m", "hostile_site", "--kind", "poison", "--site", "mallory",
             "--server", server.address, "--ca", str(server.ca_path), "--key", str(key),
             "--work-dir", str(root / "mallory")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "support")})
        log.close()

        def all_online() -> bool:
            with server.control() as control:
                online = {n.node_id for n in control.nodes() if n.status == "online"}
            return {str(n) for n in nodes.values()} <= {str(n) for n in online}

        eventually(all_online, timeout=180, what="five sites online")
        yield server, nodes
    finally:
        if poisoner is not None:
            os.killpg(poisoner.pid, signal.SIGKILL)
            poisoner.wait()
        for site in sites:
            site.stop()
        server.stop()


def final_perplexity(testbed: Testbed, server: FlowerServer, tiny_model_dir: Path, name: str,
                     site_nodes: dict[str, int], **changes) -> float:
    s3 = testbed.s3()
    config = RunConfig(
        training_round=name, base_model=str(tiny_model_dir), lora_rank=4, lora_alpha=8.0,
        lora_dropout=0.0, rounds=3, min_sites=len(site_nodes), local_max_steps=8, batch_size=4,
        sequence_length=64, learning_rate=5e-3, round_timeout_seconds=300, s3_bucket=s3.bucket,
        s3_prefix=PREFIX, s3_endpoint=s3.endpoint, sites=tuple(site_nodes), site_nodes=site_nodes,
        **changes)
    state = server.wait_run(server.start_run(config), timeout=900)
    assert (state.status, state.sub_status) == ("finished", "completed"), state
    os.environ.setdefault("AWS_ACCESS_KEY_ID", s3.access_key)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    progress = FederationStore.connect(s3.bucket, PREFIX, endpoint_url=s3.endpoint).read_progress(name)
    assert progress is not None and progress.round == 3
    final = progress.rounds[-1]
    assert final["participants"] == len(site_nodes), final
    return float(final["perplexity"])


def test_trimmed_mean_and_median_hold_off_one_poisoning_site_in_five(
        testbed: Testbed, federation, tiny_model_dir: Path) -> None:
    server, nodes = federation
    honest = {s: n for s, n in nodes.items() if s != "mallory"}
    clean = final_perplexity(testbed, server, tiny_model_dir, "clean-fedavg", honest)
    poisoned = {
        strategy: final_perplexity(testbed, server, tiny_model_dir, f"poisoned-{strategy}", nodes,
                                   strategy=strategy)
        for strategy in ("fedavg", "trimmedmean", "median")
    }
    print(f"final perplexity: clean FedAvg {clean:.2f}, with a poisoner {poisoned}")
    assert poisoned["fedavg"] > 1.1 * clean, "the poisoner does not hurt FedAvg: the test proves nothing"
    assert poisoned["trimmedmean"] <= 1.1 * clean
    assert poisoned["median"] <= 1.1 * clean
