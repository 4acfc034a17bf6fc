"""A reconcile pass acts only on the object as the API server has it now: kopf's cached body
can outlive the object (a ghost after a watch reconnect), and a pass on a ghost TrainingRound
submitted a Flower run every few seconds (seen in CI)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import kopf
import yaml
from pollinate_operator.api.base import ApiModel
from pollinate_operator.handlers.level_triggered import GROUP, PLURALS, run_pass
from pollinate_operator.settings import Settings

LOG = logging.getLogger("test")


class Status(ApiModel):
    phase: str | None = None
    run_id: str | None = None


def obj(status: dict | None = None, deleting: bool = False) -> dict:
    meta: dict = {"name": "notes-v1", "namespace": "demo", "generation": 1}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-03T08:01:42Z"
    return {"metadata": meta, "spec": {"rounds": 1}, "status": status or {}}


def pass_with(fresh: dict | None, result: Status | None = None) -> tuple[list[dict], kopf.Patch]:
    seen: list[dict] = []

    def reconcile(name, namespace, body, settings, logger):
        seen.append(dict(body.get("status") or {}))
        return result or Status(phase="Running", run_id="42")

    patch = kopf.Patch()
    run_pass("trainingrounds", "TrainingRound", reconcile, Settings(), "notes-v1", "demo", patch,
             kopf.Memo(), LOG, get=lambda plural, namespace, name: fresh)
    return seen, patch


def test_a_gone_object_gets_no_pass_and_no_status_patch():
    seen, patch = pass_with(None)
    assert seen == [] and not patch


def test_an_object_being_deleted_gets_no_pass():
    seen, patch = pass_with(obj({"phase": "Running", "runId": "7"}, deleting=True))
    assert seen == [] and not patch


def test_a_pass_reads_the_latest_status_and_patches_over_it():
    seen, patch = pass_with(obj({"phase": "Running", "runId": "41"}))
    assert seen == [{"phase": "Running", "runId": "41"}]
    assert patch.status == {"runId": "42"}  # only what differs from the live status
    # A field the live status has and the pass unset is deleted (null in the merge patch).
    _, patch = pass_with(obj({"phase": "Running", "runId": "41"}), Status(phase="Suspended"))
    assert patch.status == {"phase": "Suspended", "runId": None}


def chart_namespaced_rules() -> list[dict]:
    """The chart's namespaced RBAC rules, read from their one definition (no helm needed)."""
    helpers = Path(__file__).resolve().parents[3] / "charts/pollinate/templates/_helpers.tpl"
    block = re.search(r'define "pollinate.namespacedRules" -}}\n(.*?)\{\{- end', helpers.read_text(), re.S)
    assert block, "charts/pollinate/templates/_helpers.tpl lost pollinate.namespacedRules"
    return yaml.safe_load(block.group(1))


def test_the_charts_rbac_lets_every_pass_read_its_object_fresh() -> None:
    # Each pass GETs its object (live_body). The chart once granted TrainingRounds only list,
    # watch and patch: under it every TrainingRound pass was forbidden and no run ever started
    # (CI, the demo). The integration test that runs the operator under the chart finds this
    # in minutes; this finds it in milliseconds.
    granted = {(group, resource, verb) for rule in chart_namespaced_rules()
               for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}
    for plural in PLURALS.values():
        for verb in ("get", "list", "watch", "patch"):
            assert (GROUP, plural, verb) in granted, f"the chart does not let the operator {verb} {plural}"
        assert (GROUP, f"{plural}/status", "patch") in granted
