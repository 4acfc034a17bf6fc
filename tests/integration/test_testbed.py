"""The local control plane behaves like a real cluster: scheduling onto simulated GPU nodes,
garbage collection, Helm, version reporting, and a versioned S3 bucket."""

from __future__ import annotations

import json
import subprocess
import textwrap
import uuid

import pytest
from pollinate_testbed import Testbed
from pollinate_testbed.nodes import SITES, gpu_node_name
from pollinate_testbed.testing import Kubectl, eventually

pytestmark = pytest.mark.cluster


def gpu_job(name: str, site: str) -> str:
    return textwrap.dedent(f"""
        apiVersion: batch/v1
        kind: Job
        metadata: {{name: {name}}}
        spec:
          backoffLimit: 0
          template:
            spec:
              restartPolicy: Never
              nodeSelector: {{pollinate.dev/site: {site}}}
              containers:
              - name: train
                image: pollinate/client:dev
                resources: {{limits: {{nvidia.com/gpu: 1}}}}
        """)


def gpu_pod(name: str, site: str) -> str:
    return textwrap.dedent(f"""
        apiVersion: v1
        kind: Pod
        metadata: {{name: {name}}}
        spec:
          nodeSelector: {{pollinate.dev/site: {site}}}
          containers:
          - name: train
            image: pollinate/client:dev
            resources: {{limits: {{nvidia.com/gpu: 1}}}}
        """)


def test_kubernetes_version_is_stamped_1_35(testbed: Testbed) -> None:
    version = json.loads(Kubectl(testbed).run("get", "--raw", "/version").stdout)
    assert version["major"] == "1"
    assert version["minor"] == "35"
    assert version["gitVersion"].startswith("v1.35.")


def test_simulated_gpu_nodes_exist_per_site(testbed: Testbed) -> None:
    nodes = Kubectl(testbed).json("get", "nodes")["items"]
    by_site: dict[str, list[dict]] = {}
    for node in nodes:
        site = node["metadata"]["labels"].get("pollinate.dev/site")
        if site:
            by_site.setdefault(site, []).append(node)
    assert sorted(by_site) == sorted(s.name for s in SITES)
    for site in SITES:
        assert len(by_site[site.name]) == site.nodes
        for node in by_site[site.name]:
            assert node["status"]["allocatable"]["nvidia.com/gpu"] == "1"
            assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == site.gpu_product
    cpu_only = [n for n in nodes if "nvidia.com/gpu" not in n["status"]["capacity"]]
    assert len(cpu_only) == 1


def test_gpu_job_is_scheduled_on_its_site_and_succeeds(kubectl: Kubectl) -> None:
    kubectl.apply(gpu_job("train-b", "hospital-b"))

    def succeeded() -> bool:
        job = kubectl.json("get", "job", "train-b")
        return any(c["type"] == "Complete" and c["status"] == "True"
                   for c in job.get("status", {}).get("conditions", []))

    eventually(succeeded, what="Job train-b Complete")
    pods = kubectl.json("get", "pods", "-l", "job-name=train-b")["items"]
    assert len(pods) == 1
    assert pods[0]["status"]["phase"] == "Succeeded"
    assert pods[0]["spec"]["nodeName"] in {gpu_node_name("hospital-b", i) for i in range(2)}


def test_pod_wanting_a_gpu_at_a_full_site_stays_pending_unschedulable(kubectl: Kubectl) -> None:
    site = "clinic-c"
    for i in range(2):  # clinic-c has two nodes with one GPU each: take both
        kubectl.apply(gpu_pod(f"holder-{i}", site))
    for i in range(2):
        eventually(lambda i=i: kubectl.json("get", "pod", f"holder-{i}")["status"].get("phase") == "Running",
                   what=f"holder-{i} Running")
    kubectl.apply(gpu_pod("starved", site))

    def unschedulable() -> dict | None:
        pod = kubectl.json("get", "pod", "starved")
        for cond in pod["status"].get("conditions", []):
            if cond["type"] == "PodScheduled" and cond["status"] == "False":
                return cond
        return None

    cond = eventually(unschedulable, what="starved pod unschedulable")
    assert cond["reason"] == "Unschedulable"
    assert "nvidia.com/gpu" in cond["message"]
    pod = kubectl.json("get", "pod", "starved")
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


def test_deleting_an_owner_garbage_collects_its_dependents(kubectl: Kubectl) -> None:
    kubectl.run("create", "configmap", "owner", "--from-literal=a=b")
    uid = kubectl.json("get", "configmap", "owner")["metadata"]["uid"]
    kubectl.apply(textwrap.dedent(f"""
        apiVersion: v1
        kind: ConfigMap
        metadata:
          name: dependent
          ownerReferences:
          - {{apiVersion: v1, kind: ConfigMap, name: owner, uid: {uid}}}
        data: {{c: d}}
        """))
    assert kubectl.run("get", "configmap", "dependent", check=False).returncode == 0
    kubectl.run("delete", "configmap", "owner")
    eventually(lambda: kubectl.run("get", "configmap", "dependent", check=False).returncode != 0,
               what="dependent garbage-collected")


def test_helm_install_of_a_trivial_chart_creates_its_objects(testbed: Testbed, namespace: str,
                                                            tmp_path) -> None:
    chart = tmp_path / "trivial"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        "apiVersion: v2\nname: trivial\nversion: 0.1.0\nkubeVersion: '>=1.35.0-0'\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "cm.yaml").write_text(textwrap.dedent("""
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: {{ .Release.Name }}-greeting}
        data: {greeting: {{ .Values.greeting | quote }}}
        """))
    release = f"r{uuid.uuid4().hex[:6]}"
    helm = [str(testbed.bin_dir / "helm"), f"--kubeconfig={testbed.kubeconfig}", "-n", namespace]
    subprocess.run([*helm, "install", release, str(chart), "--set", "greeting=hi", "--wait"],
                   check=True, capture_output=True, text=True)
    cm = Kubectl(testbed, namespace).json("get", "configmap", f"{release}-greeting")
    assert cm["data"] == {"greeting": "hi"}
    listed = subprocess.run([*helm, "list", "-o", "json"], check=True, capture_output=True, text=True)
    assert [r["status"] for r in json.loads(listed.stdout)] == ["deployed"]


def test_s3_bucket_keeps_every_version_of_a_key(testbed: Testbed) -> None:
    s3 = testbed.s3_client()
    bucket = testbed.s3().bucket
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    key = f"smoke/{uuid.uuid4().hex}/adapter.bin"
    v1 = s3.put_object(Bucket=bucket, Key=key, Body=b"first")["VersionId"]
    v2 = s3.put_object(Bucket=bucket, Key=key, Body=b"second")["VersionId"]
    assert v1 != v2
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"second"
    assert s3.get_object(Bucket=bucket, Key=key, VersionId=v1)["Body"].read() == b"first"
    versions = s3.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]
    assert {v["VersionId"] for v in versions} == {v1, v2}
