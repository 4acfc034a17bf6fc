"""The operator-scale benchmark's pure parts: percentiles, which sites each Federation gets, the
resources and children it creates. No cluster here: `python bench/operator_scale.py` is the run."""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import operator_scale as scale  # bench/ is not a package

QUICK = scale.PLANS["quick"]


@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100])
@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0],
                                    list(np.linspace(0, 7, 200))])
def test_percentile_matches_numpys_linear_interpolation(values: list[float], q: float):
    assert scale.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_distribution_of_nothing_is_empty_not_an_error():
    d = scale.distribution([])
    assert d["n"] == 0 and math.isnan(d["p99"])


def test_distribution_reports_count_median_p99_and_max():
    d = scale.distribution([0.1 * i for i in range(1, 101)])
    assert d == {"n": 100, "p50": pytest.approx(5.05), "p99": pytest.approx(9.901),
                 "max": pytest.approx(10.0)}


def test_latencies_count_only_what_was_seen_and_never_go_negative():
    started = {"a": 10.0, "b": 11.0, "c": 12.0}
    seen = {"a": 10.5, "c": 11.9, "z": 1.0}
    assert scale.latencies(started, seen) == {"a": 0.5, "c": 0.0}


def test_every_site_serves_the_same_number_of_federations():
    full = scale.PLANS["full"]
    uses = Counter(s for f in range(full.federations) for s in scale.federation_sites(full, f))
    assert len(uses) == full.sites
    assert set(uses.values()) == {full.federations * full.sites_per_federation // full.sites}
    for f in range(full.federations):
        assert len(set(scale.federation_sites(full, f))) == full.sites_per_federation


def test_a_federation_cannot_have_more_sites_than_exist():
    plan = scale.Plan(**{**scale.PLANS["tiny"].__dict__, "sites_per_federation": 3})
    with pytest.raises(ValueError, match="sites_per_federation 3 > sites 2"):
        scale.federation_sites(plan, 0)


def test_gpu_nodes_are_labelled_like_the_testbeds_and_hold_every_client_pod():
    nodes = scale.gpu_nodes(QUICK)
    assert len(nodes) == QUICK.nodes == len({n["metadata"]["name"] for n in nodes})
    site_of = Counter(n["metadata"]["labels"][scale.SITE_LABEL] for n in nodes)
    assert set(site_of.values()) == {QUICK.nodes_per_site}
    assert all(n["metadata"]["annotations"] == {"kwok.x-k8s.io/node": "fake"} for n in nodes)
    gpus_per_site = QUICK.nodes_per_site * int(nodes[0]["status"]["capacity"][scale.GPU_RESOURCE])
    pods_per_site = QUICK.jobs // QUICK.sites
    assert gpus_per_site >= 2 * pods_per_site  # the direct peer's pods and the operator's both fit


def test_federations_turn_node_authentication_off_and_point_at_the_given_s3():
    feds, rounds = scale.custom_resources(QUICK, "ns", "http://127.0.0.1:33000")
    assert len(feds) == QUICK.federations and len(rounds) == QUICK.training_rounds
    fed = feds[0]
    assert fed["metadata"] == {"name": "fed-000", "namespace": "ns"}
    assert fed["spec"]["server"]["nodeAuthentication"] is False
    assert fed["spec"]["storage"]["s3"]["endpoint"] == "http://127.0.0.1:33000"
    assert "generalEvaluation" not in fed["spec"]
    site = fed["spec"]["sites"][0]
    assert site["nodeSelector"] == {scale.SITE_LABEL: site["name"]}
    assert site["resources"] == {"limits": {scale.GPU_RESOURCE: 1}}
    tr = rounds[0]
    assert tr["metadata"]["name"] == "fed-000-r0"
    assert tr["spec"]["federation"] == "fed-000"
    assert tr["spec"]["sites"] == [s["name"] for s in fed["spec"]["sites"]]


def test_the_manifests_pass_the_operators_own_models():
    from pollinate_operator.api.federation import FederationSpec
    from pollinate_operator.api.traininground import TrainingRoundSpec

    feds, rounds = scale.custom_resources(QUICK, "ns", "http://s3")
    for fed in feds:
        FederationSpec.model_validate(fed["spec"])
    for tr in rounds:
        TrainingRoundSpec.model_validate(tr["spec"])


def test_direct_children_are_what_the_operator_creates_for_the_same_resources():
    plan = scale.PLANS["tiny"]
    feds, rounds = scale.custom_resources(plan, "other", "http://s3")
    children = scale.direct_children(feds, rounds, "direct")
    kinds = Counter(o["kind"] for o in children)
    secrets_per_federation = 2 + plan.sites_per_federation  # CA, server TLS, one per site
    assert kinds == {"Secret": plan.federations * secrets_per_federation, "Deployment": plan.federations,
                     "Service": plan.federations, "Ingress": plan.federations,
                     "NetworkPolicy": plan.federations, "Job": plan.jobs}
    assert {o["metadata"]["namespace"] for o in children} == {"direct"}
    assert all("ownerReferences" not in o["metadata"] for o in children)
    jobs = sorted(o["metadata"]["name"] for o in children if o["kind"] == "Job")
    assert jobs == sorted(f"{r['metadata']['name']}-{s}" for r in rounds for s in r["spec"]["sites"])


def test_recreation_needs_a_new_uid():
    seen = scale.Sightings(first={("job-a", "old"): 1.0, ("job-a", "new"): 7.5, ("job-b", "old"): 1.0})
    deleted = {"job-a": ("old", 5.0), "job-b": ("old", 5.0)}
    assert scale.recreation(seen, deleted) == {"job-a": 2.5}


def test_scheduled_owners_groups_pods_by_job_or_deployment_instance():
    pods = scale.Sightings(
        marked={"r0-site-000-abc": 3.0, "r0-site-000-def": 2.0, "fed-000-server-x-y": 4.0},
        labels={"r0-site-000-abc": {"job-name": "r0-site-000"},
                "r0-site-000-def": {"job-name": "r0-site-000"},
                "fed-000-server-x-y": {"app.kubernetes.io/instance": "fed-000"}})
    assert scale.scheduled_owners(pods) == {"r0-site-000": 2.0, "fed-000": 4.0}


def test_reconcile_metrics_are_read_per_kind_from_prometheus_text():
    text = "\n".join([
        "# HELP pollinate_reconcile_seconds Time of one reconcile pass",
        'pollinate_reconcile_seconds_bucket{kind="federation",le="0.01"} 0.0',
        'pollinate_reconcile_seconds_count{kind="federation"} 4.0',
        'pollinate_reconcile_seconds_sum{kind="federation"} 2.0',
        'pollinate_reconcile_errors_total{kind="traininground"} 1.0',
    ])
    assert scale.reconcile_metrics(text) == {
        "federation": {"passes": 4.0, "seconds": 2.0, "mean_pass_seconds": 0.5},
        "traininground": {"errors": 1.0}}


def test_every_reconcile_latency_is_judged_bursts_and_one_at_a_time_alike():
    plan = scale.PLANS["quick"]
    direct = {"objects": 180, "apply_seconds": 1.0, "objects_per_second": 180.0,
              "request_seconds": {"p50": 0.04, "p99": 0.1}, "pods_scheduled_seconds": 18.0}
    fast, slow = scale.distribution([0.5, 0.6]), scale.distribution([0.5, 9.0])
    op = {"federations": {"create_to_server_deployment": fast},
          "training_rounds": {"create_to_every_job": slow},
          "recreate": {"all": fast},
          "one_at_a_time": {"federation_create_to_deployment": fast,
                            "training_round_create_to_every_job": fast, "recreate": slow}}
    judged = {h.case: h.met for h in scale.headlines(plan, direct, op) if h.case.startswith("reconcile")}
    assert len(judged) == 6
    assert [met for case, met in judged.items() if "sent at once" in case] == [True, False]
    assert [met for case, met in judged.items() if "one at a time" in case] == [True, True, False]
    # A run that stopped before the probes says so, and meets nothing it did not measure.
    partial = scale.headlines(plan, direct, {**op, "one_at_a_time": {}})
    missing = [h for h in partial if "one at a time" in h.case]
    assert len(missing) == 3 and all(h.measured == "not measured" and h.met is False for h in missing)
