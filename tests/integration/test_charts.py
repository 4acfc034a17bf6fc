"""The Helm charts with the real `helm` against the real local control plane: lint, rendered
objects for several value sets, install and upgrade of both charts, values the schemas reject,
and the operator itself running under nothing but the hub chart's RBAC."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from example_objects import create_s3_secret, example, example_federation, example_round
from policy_checker import checkov
from pollinate_operator import pki
from pollinate_operator.api.federation import Site
from pollinate_operator.manifests import clients
from pollinate_operator.settings import Settings
from pollinate_runtime import cli
from pollinate_testbed import Testbed
from pollinate_testbed.testing import Kubectl, eventually

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
HUB = ROOT / "charts" / "pollinate"
SITE = ROOT / "charts" / "pollinate-site"
SITE_CI_VALUES = SITE / "ci" / "existing-secret-values.yaml"
VENV_BIN = Path(sys.executable).parent

# The least-privilege rules of the hub chart, per (apiGroup, resource[, resourceName]).
# Where each comes from:
#   federations get: handlers/traininground.py reads its Federation (kube.get_custom);
#   federations, trainingrounds list/watch/patch: kopf watches them and patches its
#     finalizer and progress annotations; */status patch: kopf writes the handlers' status;
#   */finalizers update: ownerReferences with blockOwnerDeletion (manifests/security.py)
#     under the OwnerReferencesPermissionEnforcement admission plugin;
#   secrets get/list/create/patch/delete: handlers/federation.py (CA, server certificate,
#     site keys: read, listed by label, server-side applied, removed sites deleted) and the
#     S3 credentials read by clients/storage.py; watch: wake_owners_of (a deleted site key is
#     replaced at once; the watch asks only for the operator's own, by label);
#   services, deployments, ingresses, networkpolicies create/patch: server-side apply of the
#     server's objects (manifests/server.py); apply of a new object needs "create"; get:
#     clients/kube.apply reads a child first and never takes over one it does not own; and
#     list/watch: handlers/level_triggered.wake_owners_of (a changed child is applied again);
#   deployments/status get: kube.deployment_ready_replicas;
#   jobs get/list/create/patch/delete, pods list: handlers/traininground.py (client Jobs);
#   events create: kopf.event in handlers/traininground.py, and kopf's own.
NAMESPACED_RULES: dict[tuple[str, ...], set[str]] = {
    ("pollinate.dev", "federations"): {"get", "list", "watch", "patch"},
    ("pollinate.dev", "trainingrounds"): {"get", "list", "watch", "patch"},
    ("pollinate.dev", "federations/status"): {"patch"},
    ("pollinate.dev", "trainingrounds/status"): {"patch"},
    ("pollinate.dev", "federations/finalizers"): {"update"},
    ("pollinate.dev", "trainingrounds/finalizers"): {"update"},
    ("", "secrets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "services"): {"get", "list", "watch", "create", "patch"},
    ("", "pods"): {"list"},
    ("", "events"): {"create"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch"},
    ("apps", "deployments/status"): {"get"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("networking.k8s.io", "ingresses"): {"get", "list", "watch", "create", "patch"},
    ("networking.k8s.io", "networkpolicies"): {"get", "list", "watch", "create", "patch"},
}
# Only when serving every namespace: kopf's CRD watch and its (optional) cluster peering,
# whose one object it may patch is the operator's (handlers/__init__.py: peering.name).
CLUSTER_RULES: dict[tuple[str, ...], set[str]] = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("kopf.dev", "clusterkopfpeerings"): {"list", "watch"},
    ("kopf.dev", "clusterkopfpeerings", "pollinate-operator"): {"patch"},
}


def expand(rules: dict[tuple[str, ...], set[str]]) -> set[tuple[str, str, str, str]]:
    return {(key[0], key[1], verb, key[2] if len(key) > 2 else "*") for key, verbs in rules.items()
            for verb in verbs}


def rule_set(rules: list[dict]) -> set[tuple[str, str, str, str]]:
    return {(group, resource, verb, name) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]
            for name in rule.get("resourceNames", ["*"])}


# ---- helm -----------------------------------------------------------------------------------
@dataclass
class Helm:
    bed: Testbed

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(self.bed.bin_dir / "helm"), f"--kubeconfig={self.bed.kubeconfig}", *args],
            capture_output=True, text=True, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr.strip()}")
        return result

    def template(self, chart: Path, *values: str, namespace: str = "pollinate-system") -> list[dict]:
        out = self.run("template", "pollinate", str(chart), "--namespace", namespace, *values).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def helm(testbed: Testbed) -> Helm:
    return Helm(testbed)


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    (found,) = by_kind(objects, kind)
    return found


def container_of(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def help_text(*command: str) -> str:
    result = subprocess.run([str(VENV_BIN / command[0]), *command[1:], "--help"],
                            capture_output=True, text=True, timeout=120, check=True)
    return result.stdout


def assert_flags_in_help(args: list[str], text: str) -> None:
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    assert not missing, f"not in --help: {missing}"


def assert_restricted(pod: dict) -> None:
    """The restricted Pod Security profile, as the operator's own children."""
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


@pytest.fixture(scope="module")
def site_identity(tmp_path_factory) -> Path:
    """A values file with a real site key and federation CA, as the hub's operator makes them."""
    ca = pki.new_ca("pollinate test CA")
    key = pki.new_site_key()
    path = tmp_path_factory.mktemp("site") / "identity-values.yaml"
    path.write_text(yaml.safe_dump({"identity": {
        "siteKey": key.private_openssh.decode(), "caCert": ca.cert_pem.decode()}}))
    return path


def inline_site_values(site_identity: Path) -> list[str]:
    return ["-f", str(SITE_CI_VALUES), "--set", "identity.existingSecret=", "-f", str(site_identity)]


# ---- lint and render ------------------------------------------------------------------------
def test_both_charts_pass_strict_lint(helm: Helm, site_identity: Path) -> None:
    for args in (
        [str(HUB)],
        [str(HUB), "--set", "watchNamespaces={research,oncology}"],
        [str(SITE), "-f", str(SITE_CI_VALUES)],
        [str(SITE), *inline_site_values(site_identity)],
    ):
        result = helm.run("lint", "--strict", *args)
        assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
        assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def test_hub_defaults_render_one_recreated_hardened_operator(helm: Helm) -> None:
    objects = helm.template(HUB)
    assert sorted(o["kind"] for o in objects) == [
        "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "CustomResourceDefinition",
        "Deployment", "NetworkPolicy", "Role", "RoleBinding", "Service", "ServiceAccount",
        "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    # Cluster-wide, the policy binds in every namespace (tests/integration/test_admission.py).
    assert "matchResources" not in one(objects, "ValidatingAdmissionPolicyBinding")["spec"]
    assert not by_kind(helm.template(HUB, "--set", "admission.enabled=false"), "ValidatingAdmissionPolicy")
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert_restricted(pod)
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    # Every Flower server's NetworkPolicy admits the operator by these labels.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert Settings().operator_labels.items() <= labels.items()

    container = container_of(deployment)
    assert container["image"] == "ghcr.io/pollinate-dev/operator:0.1.0"
    assert container["command"] == ["pollinate-operator"]
    assert container["args"] == ["--liveness=http://0.0.0.0:8081/healthz", "--leader-elect"]
    assert_flags_in_help(container["args"], help_text("pollinate-operator"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert ports == {"metrics": 8080, "healthz": 8081}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    # The admission policy's values, which the operator repeats (reconcile/admission.py).
    admission = json.loads(env.pop("POLLINATE_ADMISSION"))
    assert admission["allowedImagePrefixes"] == ["ghcr.io/pollinate-dev/"]
    assert admission["allowHostPath"] is False and admission["deniedIngressAnnotations"]
    assert env == {"POLLINATE_RESYNC_SECONDS": "10", "POLLINATE_SETTLED_RESYNC_SECONDS": "60",
                   "POLLINATE_METRICS_PORT": "8080",
                   # The servers' NetworkPolicies admit the controller and the operator by
                   # namespace and labels; the operator's namespace is its pod's.
                   "POLLINATE_INGRESS_CONTROLLER_NAMESPACE": "ingress-nginx",
                   "POLLINATE_INGRESS_CONTROLLER_LABELS": "app.kubernetes.io/name=ingress-nginx",
                   # Nobody may scrape the servers' metrics port unless named.
                   "POLLINATE_METRICS_SCRAPER_NAMESPACE": "", "POLLINATE_METRICS_SCRAPER_LABELS": "",
                   "POLLINATE_OPERATOR_NAMESPACE": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}

    service = one(objects, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics",
                                         "protocol": "TCP"}]
    assert service["spec"]["selector"].items() <= labels.items()


def test_cluster_wide_rbac_is_exactly_the_least_privilege_set(helm: Helm) -> None:
    objects = helm.template(HUB, namespace="pollinate-system")
    role = one(objects, "ClusterRole")
    assert rule_set(role["rules"]) == expand(NAMESPACED_RULES) | expand(CLUSTER_RULES)
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "namespace": "pollinate-system",
                                    "name": one(objects, "ServiceAccount")["metadata"]["name"]}]
    assert_leader_election_role(objects, "pollinate-system")


def assert_leader_election_role(objects: list[dict], namespace: str) -> None:
    """The leader election's Lease, in the release's namespace: create one, and read and
    renew only the operator's own."""
    (role,) = [r for r in by_kind(objects, "Role") if r["metadata"]["name"].endswith("-leader-election")]
    assert role["metadata"]["namespace"] == namespace
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "resourceNames": ["pollinate-operator"], "verbs": ["get", "update"]}]
    (binding,) = [b for b in by_kind(objects, "RoleBinding")
                  if b["roleRef"]["name"] == role["metadata"]["name"]]
    assert binding["metadata"]["namespace"] == namespace


def test_watch_namespaces_gives_a_role_per_namespace_and_nothing_cluster_wide(helm: Helm) -> None:
    objects = helm.template(HUB, "--set", "watchNamespaces={research,oncology}", "--set", "logLevel=debug")
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    assert_leader_election_role(objects, "pollinate-system")
    roles = [r for r in by_kind(objects, "Role") if not r["metadata"]["name"].endswith("-leader-election")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["oncology", "research"]
    for role in roles:
        assert rule_set(role["rules"]) == expand(NAMESPACED_RULES)
    bindings = [b for b in by_kind(objects, "RoleBinding")
                if not b["metadata"]["name"].endswith("-leader-election")]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["oncology", "research"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == "pollinate-system"
    args = container_of(one(objects, "Deployment"))["args"]
    assert args == ["--liveness=http://0.0.0.0:8081/healthz", "--leader-elect", "--namespace=research",
                    "--namespace=oncology", "--verbose"]
    assert_flags_in_help(args, help_text("pollinate-operator"))


def test_hub_crds_are_the_repositorys_crds_kept_on_uninstall(helm: Helm) -> None:
    # The chart reads crds/ through a symlink: one definition of the API, no copy to drift.
    assert (HUB / "crds-src").is_symlink() and (HUB / "crds-src").resolve() == ROOT / "crds"
    annotation = ["--set", "crds.annotations.argocd\\.argoproj\\.io/sync-options=Replace=true"]
    output = helm.run("template", "pollinate", str(HUB), *annotation).stdout
    rendered = {c["metadata"]["name"]: c for c in yaml.safe_load_all(output)
                if c and c["kind"] == "CustomResourceDefinition"}
    sources = sorted((ROOT / "crds").glob("*.yaml"))
    assert sorted(rendered) == sorted(yaml.safe_load(p.read_text())["metadata"]["name"] for p in sources)
    for path in sources:
        text = path.read_text()
        # Byte for byte, but for the annotations the chart adds under metadata.
        assert text[text.index("\n  name: "):] in output, f"{path.name} is not rendered verbatim"
        source = yaml.safe_load(text)
        crd = copy.deepcopy(rendered[source["metadata"]["name"]])
        assert crd["metadata"].pop("annotations") == {
            "helm.sh/resource-policy": "keep", "argocd.argoproj.io/sync-options": "Replace=true"}
        assert crd == source

    assert not by_kind(helm.template(HUB, "--set", "crds.install=false"), "CustomResourceDefinition")


def test_both_charts_pass_the_policy_checker_with_every_exception_explained(
        helm: Helm, tmp_path: Path) -> None:
    """checkov's Kubernetes checks on both charts as installed (each in its namespace): none
    fails, and each one a chart skips carries its reason in a `checkov.io/skip` annotation."""
    for name, chart, namespace, values in (
            ("hub", HUB, "pollinate-system", ()),
            ("hub-namespaced", HUB, "pollinate-system",
             ("--set", "watchNamespaces={research}",
              "--set", "networkPolicy.metricsScraper.namespace=monitoring",
              "--set", "networkPolicy.metricsScraper.podLabels.app=prometheus")),
            ("site", SITE, "hospital-a", ("-f", str(SITE_CI_VALUES)))):
        rendered = helm.run("template", name, str(chart), "--namespace", namespace, *values).stdout
        (tmp_path / f"{name}.yaml").write_text(rendered)
    result = subprocess.run([str(checkov()), "-d", str(tmp_path), "--framework", "kubernetes",
                             "-o", "json"], capture_output=True, text=True, timeout=600)
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [(c["check_id"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, failed
    skipped = [c for r in reports for c in r["results"]["skipped_checks"]]
    assert skipped, "the exceptions the charts declare were not seen"
    for check in skipped:
        reason = check.get("check_result", {}).get("suppress_comment", "")
        assert len(reason) > 20, (check["check_id"], check["resource"], reason)
    passed = sum(r["summary"]["passed"] for r in reports)
    print(f"checkov: {passed} passed, {len(skipped)} skipped with a reason, 0 failed")
    # The operator's and the site's pods each have a NetworkPolicy that admits nobody but the
    # metrics scraper named (CKV2_K8S_6 passes on it).
    for name in ("hub", "site"):
        (policy,) = [d for d in yaml.safe_load_all((tmp_path / f"{name}.yaml").read_text())
                     if d and d["kind"] == "NetworkPolicy"]
        assert policy["spec"]["policyTypes"] == ["Ingress"] and policy["spec"]["ingress"] == []


def test_service_monitor_only_when_asked(helm: Helm) -> None:
    assert not by_kind(helm.template(HUB), "ServiceMonitor")
    objects = helm.template(HUB, "--set", "metrics.serviceMonitor.enabled=true",
                            "--set", "metrics.serviceMonitor.labels.release=prometheus")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    service_labels = one(objects, "Service")["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()


def test_the_servers_metrics_scraper_is_passed_to_the_operator_only_when_named(helm: Helm) -> None:
    def scraper_env(*args: str) -> dict[str, str]:
        env = container_of(one(helm.template(HUB, *args), "Deployment"))["env"]
        return {e["name"]: e.get("value") for e in env if "SCRAPER" in e["name"]}

    assert scraper_env() == {"POLLINATE_METRICS_SCRAPER_NAMESPACE": "",
                             "POLLINATE_METRICS_SCRAPER_LABELS": ""}
    assert scraper_env("--set", "networkPolicy.metricsScraper.namespace=monitoring",
                       "--set", "networkPolicy.metricsScraper.podLabels.app=prometheus") == {
        "POLLINATE_METRICS_SCRAPER_NAMESPACE": "monitoring",
        "POLLINATE_METRICS_SCRAPER_LABELS": "app=prometheus"}


def assert_site_client(deployment: dict, secret_name: str, quantization: str = "none") -> list[str]:
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert_restricted(pod)
    assert pod["automountServiceAccountToken"] is False
    assert pod["nodeSelector"] == {"pollinate.dev/site": "hospital-a"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    container = container_of(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["command"] == ["pollinate-client"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["site-identity"]["secret"]["secretName"] == secret_name
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "hospital-a-notes", "readOnly": True}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["data"] == clients.DATA_DIR and mounts["site-identity"] == clients.SITE_DIR

    # Its probes run what join keeps up to date (pollinate_runtime/site_health.py).
    for probe, extra in (("livenessProbe", []), ("readinessProbe", ["--ready"])):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["pollinate-client", "health"] and set(extra) <= set(command)
        assert cli.build_parser().parse_args(command[1:]).work_dir == "/var/lib/pollinate"
    args = container["args"]
    parsed = cli.build_parser().parse_args(args)
    assert (parsed.command, parsed.server, parsed.site) == ("join", "fl.example.org:443", "hospital-a")
    assert (parsed.data, parsed.ca, parsed.key) == (
        "/data/notes.jsonl", "/etc/pollinate/site/ca.crt", "/etc/pollinate/site/site.key")
    assert_flags_in_help(args, help_text("pollinate-client", "join"))
    # The same entry point, flags and file layout as the hub's in-cluster client Jobs.
    site = Site.model_validate({"name": "hospital-a", "quantization": quantization, "data": {
        "persistentVolumeClaim": {"claimName": "hospital-a-notes"}, "path": "notes.jsonl"}})
    assert set(clients.client_args(site, "fl.example.org:443")) <= set(args)
    return args


def test_site_with_existing_secret_mounts_it_and_creates_none(helm: Helm) -> None:
    objects = helm.template(SITE, "-f", str(SITE_CI_VALUES))
    assert sorted(o["kind"] for o in objects) == ["Deployment", "NetworkPolicy"]
    assert_site_client(one(objects, "Deployment"), "hospital-a-identity")


def test_site_with_inline_identity_stores_it_in_its_own_secret(helm: Helm, site_identity: Path) -> None:
    objects = helm.template(SITE, *inline_site_values(site_identity), "--set", "quantization=nf4",
                            "--set", "logLevel=debug")
    assert sorted(o["kind"] for o in objects) == ["Deployment", "NetworkPolicy", "Secret"]
    secret = one(objects, "Secret")
    given = yaml.safe_load(site_identity.read_text())["identity"]
    assert base64.b64decode(secret["data"]["site.key"]).decode() == given["siteKey"]
    assert base64.b64decode(secret["data"]["ca.crt"]).decode() == given["caCert"]
    deployment = one(objects, "Deployment")
    args = assert_site_client(deployment, secret["metadata"]["name"], quantization="nf4")
    assert "--verbose" in args
    assert "checksum/identity" in deployment["spec"]["template"]["metadata"]["annotations"]


# ---- values the schemas reject --------------------------------------------------------------
BAD_HUB_VALUES = [
    (["--set", "image.tag="], "at '/image/tag'"),
    (["--set", "replicas=0"], "at '/replicas': minimum: got 0, want 1"),
    (["--set", "replicas=4"], "at '/replicas': maximum: got 4, want 3"),
    (["--set", "logLevel=trace"], "at '/logLevel': value must be one of 'info', 'debug'"),
    (["--set", "resources.limits.memory=lots"], "at '/resources/limits/memory'"),
    (["--set", "resources.cpu=1"], "at '/resources': additional properties 'cpu' not allowed"),
    (["--set", "watchNamespaces={Research}"], "at '/watchNamespaces/0'"),
    (["--set", "metrics.port=0"], "at '/metrics/port'"),
    (["--set", "networkPolicy.metricsScraper.namespace=Monitoring"],
     "at '/networkPolicy/metricsScraper/namespace'"),
    # A namespace without pod labels would admit every pod of it.
    (["--set", "networkPolicy.metricsScraper.namespace=monitoring"],
     "at '/networkPolicy/metricsScraper/podLabels': minProperties"),
]
BAD_SITE_VALUES = [
    (["--set", "server=fl.example.org"], "at '/server': 'fl.example.org' does not match"),
    (["--set", "server=https://fl.example.org:443"], "at '/server'"),
    (["--set", "site=Hospital A"], "at '/site': 'Hospital A' does not match"),
    (["--set", "identity.siteKey=abc"], "at '/identity/siteKey': maxLength"),  # and existingSecret
    (["--set", "identity.existingSecret="], "at '/identity/siteKey'"),  # no identity at all
    (["--set", "data.configMap.name=notes"], "at '/data': 'oneOf' failed, subschemas 0, 2 matched"),
    (["--set", "data.path=../etc/passwd"], "at '/data/path'"),
    (["--set", "device=tpu"], "at '/device'"),
    (["--set", "resources.limits.nvidia\\.com/gpu=one"], "at '/resources/limits/nvidia.com~1gpu'"),
]


def value_ids(value: object) -> str:
    return " ".join(value) if isinstance(value, list) else ""


@pytest.mark.parametrize(("args", "message"), BAD_HUB_VALUES, ids=value_ids)
def test_hub_schema_rejects_bad_values_naming_them(helm: Helm, args: list[str], message: str) -> None:
    result = helm.run("template", "pollinate", str(HUB), *args, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(("args", "message"), BAD_SITE_VALUES, ids=value_ids)
def test_site_schema_rejects_bad_values_naming_them(helm: Helm, args: list[str], message: str) -> None:
    result = helm.run("template", "site", str(SITE), "-f", str(SITE_CI_VALUES), *args, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def test_site_without_any_values_names_every_missing_one(helm: Helm) -> None:
    result = helm.run("template", "site", str(SITE), check=False)
    assert result.returncode != 0
    for path in ("/server", "/site", "/identity", "/data"):
        assert f"at '{path}'" in result.stderr, result.stderr


# ---- install and upgrade into the cluster ---------------------------------------------------
def release_name() -> str:
    return f"r{uuid.uuid4().hex[:6]}"


def placement(bed: Testbed) -> list[str]:
    """Simulated nodes (kwok): nothing to add; pods are scheduled and "run". Executed by the
    node agent: a cluster-wide operator that really ran would reconcile other tests'
    Federations, so its pod is kept off every node."""
    if bed.executing:
        return ["--set-json", 'nodeSelector={"pollinate.dev/test":"never-scheduled"}']
    return []


def rolled_out(kubectl: Kubectl, deployment: str, selector: str) -> dict | None:
    """The pod of the Deployment's current template, once it is the only one not being
    deleted. Readiness is not waited for: on two busy cores kwok's simulated nodes sometimes
    miss a heartbeat, and the node controller marks their pods unready for good."""
    dep = kubectl.json("get", "deployment", deployment)
    status = dep.get("status", {})
    current = status.get("observedGeneration") == dep["metadata"]["generation"]
    if not current or status.get("updatedReplicas") != 1:
        return None
    pods = [p for p in kubectl.json("get", "pods", "-l", selector)["items"]
            if not p["metadata"].get("deletionTimestamp")]
    return pods[0] if len(pods) == 1 else None


def federation_spec_description(cluster: Kubectl) -> str:
    crd = cluster.json("get", "crd", "federations.pollinate.dev")
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["description"]


def test_hub_chart_installs_upgrades_its_crds_and_rolls_back(
        helm: Helm, testbed: Testbed, namespace: str, kubectl: Kubectl, tmp_path: Path) -> None:
    release = release_name()
    # --take-ownership: the CRDs may exist already (the tests' `kubectl apply -f crds/`).
    helm.run("install", release, str(HUB), "-n", namespace, "--take-ownership", *placement(testbed))
    try:
        name = f"{release}-pollinate"
        selector = f"app.kubernetes.io/instance={release}"
        first = eventually(lambda: rolled_out(kubectl, name, selector), what="operator pod created")
        deployment = kubectl.json("get", "deployment", name)
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        kubectl.run("get", "serviceaccount", name)
        kubectl.run("get", "service", f"{name}-metrics")
        cluster = Kubectl(testbed)
        role = cluster.json("get", "clusterrole", name)
        assert rule_set(role["rules"]) == expand(NAMESPACED_RULES) | expand(CLUSTER_RULES)
        sa = f"system:serviceaccount:{namespace}:{name}"
        for verb, resource, allowed in [
            ("watch", "federations.pollinate.dev", "yes"),
            ("patch", "trainingrounds.pollinate.dev --subresource=status", "yes"),
            ("watch", "customresourcedefinitions.apiextensions.k8s.io", "yes"),
            ("delete", "federations.pollinate.dev", "no"), ("list", "configmaps", "no"),
            ("get", "nodes", "no"), ("create", "pods", "no"),
        ]:
            out = cluster.run("auth", "can-i", verb, *resource.split(), "--all-namespaces", f"--as={sa}",
                              check=False)
            assert out.stdout.strip() == allowed, f"{sa} can-i {verb} {resource}: {out.stdout.strip()}"
        crd = cluster.json("get", "crd", "federations.pollinate.dev")
        assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == release
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

        # The upgrade: new operator resources and a changed CRD (a field's description), from
        # a copy of the chart whose CRDs differ from crds/.
        changed = tmp_path / "pollinate"
        shutil.copytree(HUB, changed, symlinks=False)
        federation_crd = changed / "crds-src" / "federation.yaml"
        marker = f"(upgraded by {release})"
        text = federation_crd.read_text()
        federation_crd.write_text(text.replace("description: The desired federation.",
                                               f"description: The desired federation {marker}.", 1))
        helm.run("upgrade", release, str(changed), "-n", namespace, "--reuse-values",
                 "--set", "resources.limits.memory=768Mi", *placement(testbed))
        deployment = kubectl.json("get", "deployment", name)
        assert container_of(deployment)["resources"]["limits"]["memory"] == "768Mi"
        second = eventually(lambda: (p := rolled_out(kubectl, name, selector))
                            and p["metadata"]["uid"] != first["metadata"]["uid"] and p,
                            what="operator pod replaced")
        assert second["spec"]["containers"][0]["resources"]["limits"]["memory"] == "768Mi"
        assert marker in federation_spec_description(cluster)

        helm.run("rollback", release, "1", "-n", namespace)
        assert marker not in federation_spec_description(cluster)
        rolled_back = kubectl.json("get", "deployment", name)
        assert container_of(rolled_back)["resources"]["limits"]["memory"] == "512Mi"
    finally:
        helm.run("uninstall", release, "-n", namespace, "--wait", check=False)
    # Uninstalling keeps the CRDs (and every Federation with them), and removes the rest.
    Kubectl(testbed).run("get", "crd", "federations.pollinate.dev", "trainingrounds.pollinate.dev")
    assert Kubectl(testbed).run("get", "clusterrole", f"{release}-pollinate", check=False).returncode != 0


def test_install_with_bad_values_creates_nothing(helm: Helm, namespace: str) -> None:
    release = release_name()
    result = helm.run("install", release, str(HUB), "-n", namespace, "--set", "replicas=0", check=False)
    assert result.returncode != 0 and "at '/replicas'" in result.stderr
    assert release not in helm.run("list", "-n", namespace, "-q").stdout


def test_site_chart_installs_on_its_sites_gpu_node_and_upgrades_its_key(
        helm: Helm, testbed: Testbed, namespace: str, kubectl: Kubectl, site_identity: Path) -> None:
    release = release_name()
    kubectl.run("create", "configmap", "hospital-b-notes", "--from-literal=notes.jsonl={}")
    values = ["-f", str(SITE_CI_VALUES), "--set", "identity.existingSecret=", "-f", str(site_identity),
              "--set", "site=hospital-b", "--set-json", 'nodeSelector={"pollinate.dev/site":"hospital-b"}',
              "--set-json", 'data={"configMap":{"name":"hospital-b-notes"},"path":"notes.jsonl"}']
    helm.run("install", release, str(SITE), "-n", namespace, *values)
    try:
        name = f"{release}-pollinate-site"
        deployment = kubectl.json("get", "deployment", name)
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        secret = kubectl.json("get", "secret", f"{name}-identity")
        assert base64.b64decode(secret["data"]["site.key"]).startswith(b"-----BEGIN OPENSSH PRIVATE KEY")
        selector = f"app.kubernetes.io/instance={release}"

        def pod_on_a_node() -> dict | None:
            pod = rolled_out(kubectl, name, selector)
            return pod if pod and pod["spec"].get("nodeName") else None

        pod = eventually(pod_on_a_node, what="site client pod scheduled")
        assert pod["spec"]["nodeName"].startswith("gpu-hospital-b-")
        assert container_of(deployment)["args"][:3] == [
            "join", "--server=fl.example.org:443", "--site=hospital-b"]

        # A new site key: the Secret changes and the client restarts to read it (Recreate:
        # the old pod is gone before the new one starts, never two SuperNodes with one key).
        new_key = pki.new_site_key().private_openssh.decode()
        helm.run("upgrade", release, str(SITE), "-n", namespace, "--reuse-values",
                 "--set", f"identity.siteKey={new_key}", "--set", "resources.requests.memory=6Gi")
        secret = kubectl.json("get", "secret", f"{name}-identity")
        assert base64.b64decode(secret["data"]["site.key"]).decode() == new_key
        upgraded = kubectl.json("get", "deployment", name)
        assert container_of(upgraded)["resources"]["requests"]["memory"] == "6Gi"
        assert (upgraded["spec"]["template"]["metadata"]["annotations"]["checksum/identity"]
                != deployment["spec"]["template"]["metadata"]["annotations"]["checksum/identity"])
        eventually(lambda: (p := pod_on_a_node()) and p["metadata"]["uid"] != pod["metadata"]["uid"],
                   what="site client restarted with the new key")
    finally:
        helm.run("uninstall", release, "-n", namespace, "--wait", check=False)
    assert kubectl.run("get", "deployment", f"{release}-pollinate-site", check=False).returncode != 0


# ---- the operator under the chart's RBAC ----------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_account_kubeconfig(bed: Testbed, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that is the ServiceAccount: what the operator's pod would authenticate as."""
    token = Kubectl(bed, namespace).run("create", "token", account, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(bed.kubeconfig.read_text())
    cluster = admin["clusters"][0]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "clusters": [cluster],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": cluster["name"], "user": account,
                                                   "namespace": namespace}}],
        "current-context": account,
    }))
    return path


@pytest.fixture
def second_namespace(testbed: Testbed) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    Kubectl(testbed).run("create", "namespace", name)
    yield name
    Kubectl(testbed).run("delete", "namespace", name, "--wait=false", check=False)


def api_status(kubeconfig: Path, method: str, api_path: str, body: dict | None = None) -> int:
    """The HTTP status the API server answers a request authenticated by `kubeconfig`'s token."""
    config = yaml.safe_load(kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    context = ssl.create_default_context(
        cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
    request = urllib.request.Request(
        cluster["server"] + api_path, method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {config['users'][0]['user']['token']}",
                 "Content-Type": "application/merge-patch+json" if method == "PATCH" else "application/json"})
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def secret_body(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "stringData": {"password": "not for the operator"}}


def assert_forbidden_beyond_its_rules(testbed: Testbed, kubeconfig: Path, release_namespace: str,
                                      watched: str, account: str) -> None:
    """What the operator's ServiceAccount must not do, each asked twice: a real request with
    its token (the API server answers 403) and `kubectl auth can-i` as it (no). The same
    token may read the watched namespace's Secrets, so a 403 is the rules', not a bad token."""
    admin = Kubectl(testbed)
    admin.run("create", "secret", "generic", "not-for-the-operator", "-n", release_namespace,
              "--from-literal=password=not-for-the-operator")
    assert api_status(kubeconfig, "GET", f"/api/v1/namespaces/{watched}/secrets/clinical-notes-ca") == 200
    assert api_status(kubeconfig, "GET", f"/api/v1/namespaces/{watched}/secrets") == 200

    outside = release_namespace  # the operator's own namespace is not one it serves
    forbidden = [
        # The issue's own example: Secrets of a namespace the operator does not serve.
        ("GET", f"/api/v1/namespaces/{outside}/secrets/not-for-the-operator", None,
         ["get", "secrets/not-for-the-operator", "-n", outside]),
        ("GET", f"/api/v1/namespaces/{outside}/secrets", None, ["list", "secrets", "-n", outside]),
        ("GET", "/api/v1/namespaces/kube-system/secrets", None, ["list", "secrets", "-n", "kube-system"]),
        ("GET", "/api/v1/secrets", None, ["list", "secrets", "--all-namespaces"]),
        ("POST", f"/api/v1/namespaces/{outside}/secrets", secret_body("planted"),
         ["create", "secrets", "-n", outside]),
        # Nodes, and a shell in any pod.
        ("GET", "/api/v1/nodes", None, ["list", "nodes"]),
        ("POST", f"/api/v1/namespaces/{watched}/pods/any/exec?command=id&stdout=true", None,
         ["create", "pods", "--subresource=exec", "-n", watched]),
        ("POST", f"/api/v1/namespaces/{watched}/pods", {"apiVersion": "v1", "kind": "Pod",
                                                         "metadata": {"name": "x"}},
         ["create", "pods", "-n", watched]),
        ("GET", f"/api/v1/namespaces/{watched}/configmaps", None, ["list", "configmaps", "-n", watched]),
        # Its own API and others' beyond what it uses: no deleting a user's Federation, no
        # reading CRDs when serving named namespaces.
        ("DELETE", f"/apis/pollinate.dev/v1alpha1/namespaces/{watched}/federations/clinical-notes", None,
         ["delete", "federations.pollinate.dev", "-n", watched]),
        ("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", None,
         ["list", "customresourcedefinitions.apiextensions.k8s.io"]),
        # Nothing cluster-scoped written, no way to grant itself more.
        ("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}},
         ["create", "namespaces"]),
        ("POST", "/apis/rbac.authorization.k8s.io/v1/clusterroles",
         {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "x"}},
         ["create", "clusterroles.rbac.authorization.k8s.io"]),
        ("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{watched}/rolebindings",
         {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "x"},
          "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
          "subjects": [{"kind": "ServiceAccount", "name": account.rsplit(":", 1)[1],
                        "namespace": release_namespace}]},
         ["create", "rolebindings.rbac.authorization.k8s.io", "-n", watched]),
        ("PATCH", f"/api/v1/namespaces/{watched}", {"metadata": {"labels": {"x": "y"}}},
         ["patch", f"namespaces/{watched}"]),
    ]
    allowed = []
    for method, api_path, body, can_i in forbidden:
        code = api_status(kubeconfig, method, api_path, body)
        answer = admin.run("auth", "can-i", *can_i, f"--as={account}", check=False).stdout.strip()
        if code != 403 or answer != "no":
            allowed.append(f"{method} {api_path}: HTTP {code}; can-i {' '.join(can_i)}: {answer}")
    assert not allowed, "the operator's ServiceAccount may do more than it needs:\n" + "\n".join(allowed)
    assert admin.run("get", "secret", "planted", "-n", outside, check=False).returncode != 0


def refusals(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if re.search(r"forbidden|\b403\b", line, re.I)]


@pytest.mark.slow  # starts the real operator and takes two resources through their lifecycle
def test_operator_reconciles_under_nothing_but_the_namespaced_rbac(
        helm: Helm, testbed: Testbed, crds: None, namespace: str, second_namespace: str,
        tmp_path: Path) -> None:
    """The chart installed for one namespace; then the real operator, started with the
    Deployment's command, args and environment and authenticated as the chart's
    ServiceAccount, takes a Federation and a TrainingRound through their lifecycle without
    a single Forbidden."""
    watched = second_namespace
    release = release_name()
    helm.run("install", release, str(HUB), "-n", namespace, "--set", "crds.install=false",
             "--set", f"watchNamespaces={{{watched}}}", "--set", "resyncSeconds=2",
             "--set-json", 'nodeSelector={"pollinate.dev/test":"never-scheduled"}')
    log_path = tmp_path / "operator.log"
    proc = None
    try:
        name = f"{release}-pollinate"
        container = container_of(Kubectl(testbed, namespace).json("get", "deployment", name))
        liveness, metrics = free_port(), free_port()
        args = [re.sub(r":\d+/healthz$", f":{liveness}/healthz", a) for a in container["args"]]
        # The pod's own values; a downward-API one (its namespace) as the kubelet fills it in.
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        env["POLLINATE_OPERATOR_NAMESPACE"] = namespace
        env["POLLINATE_METRICS_PORT"] = str(metrics)
        kubeconfig = service_account_kubeconfig(testbed, namespace, name, tmp_path / "sa-kubeconfig")
        process_env = {**os.environ, **env, "KUBECONFIG": str(kubeconfig)}
        process_env.pop("POLLINATE_FLOWER_ADDRESS", None)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([str(VENV_BIN / container["command"][0]), *args], env=process_env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        k = Kubectl(testbed, watched)
        create_s3_secret(k)
        k.apply(example_federation())

        def federation_status() -> dict:
            return k.json("get", "federation", "clinical-notes").get("status", {})

        eventually(lambda: federation_status().get("phase") == "Ready", timeout=90, what="Federation Ready")
        for kind, child in [("deployment", "clinical-notes-server"), ("service", "clinical-notes-server"),
                            ("ingress", "clinical-notes-server"), ("networkpolicy", "clinical-notes-server"),
                            ("secret", "clinical-notes-ca"), ("secret", "clinical-notes-site-clinic-c")]:
            k.run("get", kind, child)

        assert_forbidden_beyond_its_rules(testbed, kubeconfig, namespace, watched,
                                          f"system:serviceaccount:{namespace}:{name}")

        k.apply(example_round())
        eventually(lambda: k.run("get", "job", "notes-v1-hospital-a", check=False).returncode == 0,
                   timeout=90, what="client Job created")
        eventually(lambda: k.json("get", "traininground", "notes-v1").get("status", {}).get("phase"),
                   timeout=60, what="TrainingRound status written")

        # A site leaves: its key Secret is deleted.
        sites = example("federation")["spec"]["sites"]
        k.apply(example_federation(sites=[s for s in sites if s["name"] != "alice-laptop"]))
        eventually(lambda: k.run("get", "secret", "clinical-notes-site-alice-laptop", check=False).returncode,
                   timeout=60, what="removed site's key deleted")

        with urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=10) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
            assert b'pollinate_reconciles_total{kind="federation"}' in response.read()

        k.run("delete", "traininground", "notes-v1", "--timeout=60s")
        k.run("delete", "federation", "clinical-notes", "--timeout=60s")
    except AssertionError as failure:
        log = log_path.read_text(errors="replace")
        detail = "\n".join(refusals(log)[:10])
        tail = "\n".join(log.splitlines()[-60:])
        raise AssertionError(f"{failure}\nrefused under the chart's RBAC:\n{detail}\n"
                             f"--- operator log, last lines:\n{tail}") from failure
    finally:
        # Deleted while the operator still runs, so that its finalizers go with it; whatever
        # a failed run left behind loses them by force, or the namespace could never go.
        admin = Kubectl(testbed, watched)
        for kind in ("trainingrounds", "federations"):
            admin.run("delete", kind, "--all", "--timeout=30s", check=False)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for kind in ("trainingrounds", "federations"):
            for item in admin.json("get", kind)["items"]:
                admin.run("patch", kind, item["metadata"]["name"], "--type=merge",
                          "-p", '{"metadata":{"finalizers":[]}}', check=False)
        helm.run("uninstall", release, "-n", namespace, "--wait", check=False)
    log = log_path.read_text(errors="replace")
    refused = refusals(log)
    assert not refused, "the operator was refused under the chart's RBAC:\n" + "\n".join(refused[:20])
    # Watching named namespaces, the operator scans nothing cluster-wide: not even the refusals
    # kopf would otherwise retry for a minute before falling back.
    assert "Falling back to a list of namespaces which are assumed to exist" not in log
