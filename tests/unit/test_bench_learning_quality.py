"""The learning-quality benchmark runs its arms end to end on the tiny model and a few blocks of
each site corpus, and reports every perplexity, ratio and target. No quality is asserted at this
size: only that the figures are there and consistent."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SITES = ("hospital-a", "hospital-b", "clinic-c")


pytestmark = pytest.mark.slow  # trains the tiny model in every arm of the benchmark


@pytest.fixture(scope="module")
def learning_quality(tmp_path_factory: pytest.TempPathFactory) -> dict:
    results = tmp_path_factory.mktemp("learning_quality")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "learning_quality.py"), "--tiny",
                           "--results-dir", str(results)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((results / "learning_quality.json").read_text())


def test_every_arm_is_scored_on_each_site_and_the_union(learning_quality: dict):
    assert learning_quality["benchmark"] == "learning_quality"
    assert learning_quality["command"] == "python bench/learning_quality.py --tiny"
    arms = set(learning_quality["perplexity"])
    assert {"base", "federated", "central", *(f"local {s}" for s in SITES)} <= arms
    for scores in learning_quality["perplexity"].values():
        assert set(scores) == {*SITES, "union"}
        assert all(math.isfinite(v) and v > 1 for v in scores.values())
        # The union is a token-weighted mean of the sites' losses.
        assert min(scores[s] for s in SITES) <= scores["union"] <= max(scores[s] for s in SITES)


def test_federated_and_central_take_the_same_number_of_optimiser_steps(learning_quality: dict):
    steps = learning_quality["optimizer_steps"]
    config = learning_quality["run_config"]
    assert steps["federated"] == steps["central"] == config["rounds"] * 3 * config["local_max_steps"]
    assert steps["local_only_per_site"] == config["rounds"] * config["local_max_steps"]
    assert [r["round"] for r in learning_quality["federated_rounds"]] == list(range(1, config["rounds"] + 1))


def test_ratios_and_targets_follow_from_the_perplexities(learning_quality: dict):
    ppl, ratios = learning_quality["perplexity"], learning_quality["ratios"]
    fed = ppl["federated"]["union"]
    assert ratios["federated_over_central_union"] == pytest.approx(fed / ppl["central"]["union"])
    for site in SITES:
        local = ppl[f"local {site}"]["union"]
        assert ratios["federated_over_local_union"][site] == pytest.approx(fed / local)
    heads = learning_quality["headlines"]
    targeted = [h for h in heads if h["target"] != "-"]
    assert len(targeted) == 3 and all(isinstance(h["met"], bool) for h in targeted)
    central = next(h for h in targeted if "central" in h["case"] and "FedAdam" not in h["case"])
    assert central["met"] == (ratios["federated_over_central_union"] <= 1.05)
    # The server-optimiser arm: FedAdam on the same sites and steps, judged by the same target.
    fedadam = next(h for h in targeted if "FedAdam" in h["case"])
    assert ratios["fedadam_over_central_union"] == pytest.approx(
        ppl["federated, FedAdam"]["union"] / ppl["central"]["union"])
    assert fedadam["met"] == (ratios["fedadam_over_central_union"] <= 1.05)
    assert learning_quality["notes"]
