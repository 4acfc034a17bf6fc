"""The client Job of an in-cluster site: `pollinate-client join` on that site's GPU nodes."""

from __future__ import annotations

from ..api.federation import FederationSpec, GeneralEvaluation, ResourceRequirements, Site
from ..api.traininground import TrainingRoundSpec
from . import names
from .security import CONTAINER_SECURITY_CONTEXT, POD_SECURITY_CONTEXT

SITE_DIR = "/etc/pollinate/site"
DATA_DIR = "/data"
GENERAL_DIR = "/general"
WORK_DIR = "/var/lib/pollinate"
# The runtime sizes torch's CPU threads from this (pollinate_runtime.train.device.cpu_threads).
CPU_MILLICORES_ENV = "POLLINATE_CPU_MILLICORES"


def data_volume(site: Site) -> dict:
    data = site.data
    assert data is not None, "the CRD requires data for in-cluster sites"
    if data.persistent_volume_claim:
        source = {"persistentVolumeClaim": {
            "claimName": data.persistent_volume_claim.claim_name, "readOnly": True}}
    elif data.host_path:
        source = {"hostPath": {"path": data.host_path.path, "type": "Directory"}}
    else:
        assert data.config_map is not None
        source = {"configMap": {"name": data.config_map.name}}
    return {"name": "data", **source}


def general_volume(general: GeneralEvaluation) -> dict:
    if general.persistent_volume_claim:
        return {"name": "general", "persistentVolumeClaim": {
            "claimName": general.persistent_volume_claim.claim_name, "readOnly": True}}
    assert general.config_map is not None, "the CRD requires one source"
    return {"name": "general", "configMap": {"name": general.config_map.name}}


def client_args(site: Site, server_address: str, general: GeneralEvaluation | None = None) -> list[str]:
    data = site.data
    data_path = f"{DATA_DIR}/{data.path}" if data and data.path else DATA_DIR
    extra = []
    if general is not None:
        extra.append(f"--general-eval={GENERAL_DIR}/{general.path}" if general.path
                     else f"--general-eval={GENERAL_DIR}")
    return [
        "join",
        f"--server={server_address}",
        f"--site={site.name}",
        f"--data={data_path}",
        f"--ca={SITE_DIR}/ca.crt",
        f"--key={SITE_DIR}/site.key",
        f"--device={site.device}",
        f"--quantization={site.quantization}",
        f"--work-dir={WORK_DIR}",
        *extra,
    ]


def cpu_budget_env(resources: ResourceRequirements | None) -> list[dict]:
    """The CPU the site's container may use, in millicores, from its limit or else its request
    (the downward API resolves the quantity). Without either the runtime falls back to the
    cgroup quota and the CPUs it may run on: torch's default of one thread per core of the
    *node* oversubscribes a pod that gets a share of it."""
    for kind in ("limits", "requests"):
        if "cpu" in (getattr(resources, kind, None) or {}):
            return [{"name": CPU_MILLICORES_ENV, "valueFrom": {"resourceFieldRef": {
                "containerName": "client", "resource": f"{kind}.cpu", "divisor": "1m"}}}]
    return []


def client_job(
    training_round: str, namespace: str, tr: TrainingRoundSpec,
    federation: str, fed: FederationSpec, site: Site, server_address: str,
) -> dict:
    labels = names.client_labels(federation, training_round, site.name)
    resources = site.resources.to_wire() if site.resources else {}
    env = [
        {"name": "POLLINATE_SITE", "value": site.name},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "HOME", "value": WORK_DIR},
        *cpu_budget_env(site.resources),
    ]
    env_from = []
    if (fed.base_model.uri or "").startswith("s3://"):
        # Only to read base weights from the federation's own bucket.
        env_from.append({"secretRef": {"name": fed.storage.s3.credentials_secret}})
        if fed.storage.s3.endpoint:
            env.append({"name": "POLLINATE_S3_ENDPOINT", "value": fed.storage.s3.endpoint})
    container = {
        "name": "client",
        "image": fed.client_image,
        "command": ["pollinate-client"],
        "args": client_args(site, server_address, fed.general_evaluation),
        "env": env,
        "resources": resources,
        "securityContext": CONTAINER_SECURITY_CONTEXT,
        "volumeMounts": [
            {"name": "data", "mountPath": DATA_DIR, "readOnly": True},
            {"name": "site-identity", "mountPath": SITE_DIR, "readOnly": True},
            {"name": "work", "mountPath": WORK_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if env_from:
        container["envFrom"] = env_from
    volumes = [
        data_volume(site),
        {"name": "site-identity", "secret": {
            "secretName": names.site_secret(federation, site.name), "defaultMode": 0o400}},
        {"name": "work", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if fed.general_evaluation is not None:
        container["volumeMounts"].append({"name": "general", "mountPath": GENERAL_DIR, "readOnly": True})
        volumes.append(general_volume(fed.general_evaluation))
    pod_spec: dict = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": POD_SECURITY_CONTEXT,
        "containers": [container],
        "volumes": volumes,
    }
    if site.node_selector:
        pod_spec["nodeSelector"] = dict(site.node_selector)
    if site.tolerations:
        pod_spec["tolerations"] = list(site.tolerations)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": names.client_job(training_round, site.name),
            "namespace": namespace,
            "labels": labels,
        },
        "spec": {
            "backoffLimit": tr.backoff_limit,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
