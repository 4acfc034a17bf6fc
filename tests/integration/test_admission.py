"""The hub chart's admission policy (charts/pollinate/templates/admission.yaml) on the real API
server: a Federation's author, a `kubectl --as` user with rights only in their namespace,
cannot make the operator use what they could not use themselves. One test per rule; every
request is a server-side dry run, so admission runs and nothing is stored."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from example_objects import create_s3_secret, example
from operator_process import OperatorProcess
from pollinate_testbed import Testbed
from pollinate_testbed.testing import Kubectl, eventually

HUB = Path(__file__).resolve().parents[2] / "charts" / "pollinate"
AUTHOR = "alice@research.example"


def render_policy(testbed: Testbed, namespace: str, *values: str) -> str:
    """The chart's policy and binding, bound to `namespace` alone (watchNamespaces): the other
    tests' namespaces on this testbed are not affected."""
    return subprocess.run(
        [str(testbed.bin_dir / "helm"), "template", f"adm-{namespace}", str(HUB), "--show-only",
         "templates/admission.yaml", "--set", f"watchNamespaces={{{namespace}}}", *values],
        capture_output=True, text=True, check=True, timeout=120).stdout


def bind_role(kubectl: Kubectl, name: str, rules: list[dict]) -> None:
    """A Role with `rules` in the test's namespace, bound to the author."""
    kubectl.apply(yaml.safe_dump_all([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name},
         "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": AUTHOR}]}]))


def grant_author(kubectl: Kubectl) -> None:
    """The author may write Federations here and read one Secret, ConfigMap and claim each."""
    readable = {"secrets": "author-s3", "configmaps": "author-notes",
                "persistentvolumeclaims": "author-claim"}
    rules = [{"apiGroups": ["pollinate.dev"], "resources": ["federations"],
              "verbs": ["get", "list", "create", "update", "patch"]}]
    rules += [{"apiGroups": [""], "resources": [kind], "resourceNames": [name], "verbs": ["get"]}
              for kind, name in readable.items()]
    bind_role(kubectl, "federation-author", rules)


def allowed_federation() -> dict:
    """The example Federation, naming only what the author may read."""
    fed = example("federation")
    fed["spec"]["storage"]["s3"]["credentialsSecret"] = "author-s3"
    fed["spec"]["generalEvaluation"] = {"configMap": {"name": "author-notes"}}
    for site in fed["spec"]["sites"]:
        if "data" in site:
            site["data"] = {"configMap": {"name": "author-notes"}}
    return fed


class Author:
    def __init__(self, kubectl: Kubectl) -> None:
        self.kubectl = kubectl

    def create(self, fed: dict) -> subprocess.CompletedProcess:
        return self.kubectl.run("create", "--dry-run=server", f"--as={AUTHOR}", "-f", "-",
                                input=yaml.safe_dump(fed), check=False)

    def refused(self, fed: dict) -> str:
        result = self.create(fed)
        assert result.returncode != 0, "the policy admitted it"
        assert "ValidatingAdmissionPolicy" in result.stderr, result.stderr
        return result.stderr


def install(testbed: Testbed, kubectl: Kubectl, *values: str) -> Iterator[Author]:
    policy = render_policy(testbed, kubectl.namespace, *values)
    admin = Kubectl(testbed)
    admin.apply(policy)
    grant_author(kubectl)
    author = Author(kubectl)
    try:
        # The API server compiles a new policy and binding within a second or two.
        eventually(lambda: "ValidatingAdmissionPolicy" in author.create(
            {**allowed_federation(), "spec": {**allowed_federation()["spec"],
                                              "clientImage": "evil.example/miner:1"}}).stderr,
                   timeout=60, what="the admission policy in force")
        yield author
    finally:
        admin.run("delete", "-f", "-", "--wait=false", input=policy, check=False)


@pytest.fixture
def author(testbed: Testbed, crds: None, kubectl: Kubectl) -> Iterator[Author]:
    yield from install(testbed, kubectl)


def test_an_author_may_create_a_federation_naming_only_what_they_can_read(author: Author) -> None:
    result = author.create(allowed_federation())
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("field", "change"), [
    ("spec.storage.s3.credentialsSecret",
     lambda f: f["spec"]["storage"]["s3"].update(credentialsSecret="payroll-db")),
    ("spec.server.tls.secretName", lambda f: f["spec"]["server"].update(tls={"secretName": "payroll-db"})),
    ("spec.server.ingress.tlsSecret",
     lambda f: f["spec"]["server"]["ingress"].update(tlsSecret="payroll-db")),
])
def test_a_secret_the_author_cannot_read_is_refused_naming_the_field(author: Author, field, change) -> None:
    fed = allowed_federation()
    change(fed)
    message = author.refused(fed)
    assert f'{field}: you may not get Secret "payroll-db"' in message, message


def test_a_configmap_the_author_cannot_read_is_refused_naming_the_site(author: Author) -> None:
    fed = allowed_federation()
    fed["spec"]["sites"][0]["data"] = {"configMap": {"name": "other-teams-notes"}}
    site = fed["spec"]["sites"][0]["name"]
    message = author.refused(fed)
    assert f'spec.sites[{site}].data.configMap.name: you may not get ConfigMap "other-teams-notes"' in message
    fed = allowed_federation()
    fed["spec"]["generalEvaluation"] = {"configMap": {"name": "other-teams-notes"}}
    assert "spec.generalEvaluation.configMap.name" in author.refused(fed)


def test_a_claim_the_author_cannot_read_is_refused_and_one_they_can_is_not(author: Author) -> None:
    fed = allowed_federation()
    fed["spec"]["sites"][0]["data"] = {"persistentVolumeClaim": {"claimName": "other-teams-claim"}}
    assert 'persistentVolumeClaim.claimName: you may not get PersistentVolumeClaim "other-teams-claim"' \
        in author.refused(fed)
    fed["spec"]["sites"][0]["data"] = {"persistentVolumeClaim": {"claimName": "author-claim"}}
    assert author.create(fed).returncode == 0


@pytest.mark.parametrize("field", ["spec.server.image", "spec.clientImage"])
def test_an_image_outside_the_allowlist_is_refused_naming_the_field(author: Author, field: str) -> None:
    fed = allowed_federation()
    if field == "spec.server.image":
        fed["spec"]["server"]["image"] = "docker.io/mallory/superlink:latest"
    else:
        fed["spec"]["clientImage"] = "docker.io/mallory/superlink:latest"
    message = author.refused(fed)
    assert f'{field}: image "docker.io/mallory/superlink:latest" is not under an allowed prefix' in message
    assert "ghcr.io/pollinate-dev/" in message


def test_hostpath_data_is_refused_naming_the_site(author: Author) -> None:
    fed = allowed_federation()
    site = fed["spec"]["sites"][1]
    site["data"] = {"hostPath": {"path": "/etc/kubernetes"}}
    message = author.refused(fed)
    assert f"spec.sites[{site['name']}].data.hostPath: hostPath data is not allowed" in message


@pytest.mark.parametrize("annotation", [
    "nginx.ingress.kubernetes.io/configuration-snippet",
    "nginx.ingress.kubernetes.io/proxy-ssl-verify",
    "nginx.ingress.kubernetes.io/rewrite-target",
    "nginx.ingress.kubernetes.io/auth-url",
    "traefik.ingress.kubernetes.io/router.middlewares",
])
def test_an_ingress_annotation_on_the_deny_list_is_refused_naming_it(author: Author, annotation: str) -> None:
    fed = allowed_federation()
    fed["spec"]["server"]["ingress"]["annotations"] = {annotation: "off",
                                                       "cert-manager.io/cluster-issuer": "corp"}
    message = author.refused(fed)
    assert f'spec.server.ingress.annotations: "{annotation}" may not be set' in message
    assert "cert-manager.io" not in message


def test_an_update_is_checked_only_for_what_it_adds(author: Author, kubectl: Kubectl) -> None:
    # A Federation an admin created naming a Secret the author cannot read: the author (or the
    # operator, adding its finalizer) may still change other fields, but not add another.
    fed = allowed_federation()
    fed["metadata"]["name"] = "admins-federation"
    fed["spec"]["storage"]["s3"]["credentialsSecret"] = "payroll-db"
    kubectl.apply(yaml.safe_dump(fed))
    patch = ["patch", "federation", "admins-federation", "--type=merge", f"--as={AUTHOR}", "--dry-run=server"]
    ok = kubectl.run(*patch, "-p", '{"metadata":{"labels":{"team":"oncology"}}}', check=False)
    assert ok.returncode == 0, ok.stderr
    bad = kubectl.run(*patch, "-p", '{"spec":{"server":{"tls":{"secretName":"hr-keys"}}}}', check=False)
    assert bad.returncode != 0
    assert 'spec.server.tls.secretName: you may not get Secret "hr-keys"' in bad.stderr


def test_the_chart_can_allow_hostpath_and_more_images(testbed: Testbed, crds: None,
                                                      kubectl: Kubectl) -> None:
    images = "admission.allowedImagePrefixes={ghcr.io/pollinate-dev/,registry.example.org/}"
    for author in install(testbed, kubectl, "--set", "admission.allowHostPath=true", "--set", images):
        fed = allowed_federation()
        fed["spec"]["sites"][1]["data"] = {"hostPath": {"path": "/srv/notes"}}
        fed["spec"]["clientImage"] = "registry.example.org/pollinate/client:0.1.0"
        result = author.create(copy.deepcopy(fed))
        assert result.returncode == 0, result.stderr


def test_more_names_than_it_checks_one_by_one_need_the_right_to_read_them_all(
        author: Author, kubectl: Kubectl) -> None:
    # Each authorization check costs a third of a CEL expression's budget: the policy checks
    # at most eight ConfigMaps by name, and an author who may read every ConfigMap here needs
    # no check by name at all.
    names = [f"notes-{i}" for i in range(9)]
    bind_role(kubectl, "nine-notes", [{"apiGroups": [""], "resources": ["configmaps"],
                                       "resourceNames": names, "verbs": ["get"]}])
    fed = allowed_federation()
    template = next(s for s in fed["spec"]["sites"] if "data" in s)
    fed["spec"]["sites"] = [{**copy.deepcopy(template), "name": f"site-{i}",
                             "data": {"configMap": {"name": name}}} for i, name in enumerate(names)]
    message = eventually(lambda: "may name at most 8" in (m := author.create(fed).stderr) and m,
                         timeout=30, what="the new Role in force")
    assert "names 10 ConfigMaps it did not name before" in message  # nine and the general one
    bind_role(kubectl, "all-notes", [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}])
    eventually(lambda: author.create(fed).returncode == 0, timeout=30,
               what="accepted with the right to read them all")


def operator_admission_env(testbed: Testbed) -> str:
    """POLLINATE_ADMISSION as the hub chart's Deployment gives it to the operator."""
    rendered = subprocess.run(
        [str(testbed.bin_dir / "helm"), "template", "pollinate", str(HUB), "--show-only",
         "templates/deployment.yaml"], capture_output=True, text=True, check=True, timeout=120).stdout
    (container,) = yaml.safe_load(rendered)["spec"]["template"]["spec"]["containers"]
    return next(e["value"] for e in container["env"] if e["name"] == "POLLINATE_ADMISSION")


def test_without_the_policy_the_operator_refuses_what_needs_no_author_and_says_so(
        testbed: Testbed, crds: None, kubectl: Kubectl, tmp_path: Path) -> None:
    # A cluster without the policy (older than 1.34, or admission.enabled=false): the operator,
    # given the chart's values, applies nothing for a Federation with a foreign image and says
    # why; fixed, it goes on.
    operator = OperatorProcess(testbed, tmp_path / "operator.log",
                               {"POLLINATE_ADMISSION": operator_admission_env(testbed)})
    operator.start()
    try:
        create_s3_secret(kubectl)
        fed = example("federation")
        fed["spec"]["server"]["nodeAuthentication"] = False
        fed["spec"]["clientImage"] = "docker.io/mallory/miner:1"
        kubectl.apply(yaml.safe_dump(fed))

        def ready() -> dict:
            st = kubectl.json("get", "federation", "clinical-notes").get("status", {})
            return next((c for c in st.get("conditions", []) if c["type"] == "Ready"), {})

        refused = eventually(lambda: ready().get("reason") == "PolicyViolation" and ready(), timeout=60,
                             what="the Federation refused by the operator")
        assert refused["status"] == "False"
        assert refused["message"].startswith('spec.clientImage: image "docker.io/mallory/miner:1" is not '
                                             "under an allowed prefix")
        reasons = {e["reason"] for e in kubectl.json("get", "events", "--field-selector",
                                                     "involvedObject.name=clinical-notes")["items"]}
        assert "PolicyViolation" in reasons
        assert not kubectl.json("get", "deployments")["items"], "nothing is applied for a refused spec"
        kubectl.run("patch", "federation", "clinical-notes", "--type=merge",
                    "-p", '{"spec":{"clientImage":"ghcr.io/pollinate-dev/client:0.1.0"}}')
        eventually(lambda: kubectl.json("get", "deployments")["items"], timeout=60,
                   what="the server applied once the image is allowed")
    finally:
        operator.stop()
