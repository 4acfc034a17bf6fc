"""In execute mode the pods really run: the node agent starts each container's command as a
local process in the pod's own network namespace, with its Secrets, ConfigMaps and token
mounted, and reports what happens to the API server, as kubelet and kube-proxy would.

These tests start their own executing testbed (module scope, in a temporary state dir, with
its ports and network shifted by PORT_OFFSET), so they neither need nor disturb the session's
simulated cluster; the last test stops it and checks nothing is left behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from example_objects import create_s3_secret
from pollinate_testbed import Ports, Testbed, pki
from pollinate_testbed.execute_mode import IN_CLUSTER_S3_ENDPOINT
from pollinate_testbed.outside import OutsideHost
from pollinate_testbed.pod_network import HostNetwork
from pollinate_testbed.pod_worker import container_log
from pollinate_testbed.testing import Kubectl, eventually

pytestmark = [pytest.mark.cluster, pytest.mark.execute]


@pytest.fixture(scope="module", autouse=True)
def _root() -> None:
    # Not a skip: `make demo` and the e2e tests need the node agent too, so a machine where it
    # cannot run must fail here with the reason, not pass quietly.
    assert os.geteuid() == 0, "the node agent needs root (network namespaces, bind mounts)"

PORT_OFFSET = 4700


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    ports = Ports(**{k: v + PORT_OFFSET for k, v in asdict(Ports()).items()})
    testbed = Testbed(state_dir=tmp_path_factory.mktemp("executing-testbed"), ports=ports)
    testbed.up(log=lambda _: None, execute=True)
    yield testbed
    testbed.down(quiet=True)


@pytest.fixture
def kubectl(bed: Testbed) -> Iterator[Kubectl]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    Kubectl(bed).run("create", "namespace", name)
    k = Kubectl(bed, name)
    # Pods of a namespace need its default ServiceAccount, made by a controller shortly after.
    eventually(lambda: k.run("get", "serviceaccount", "default", check=False).returncode == 0,
               timeout=30, what="the default ServiceAccount")
    yield k
    if bed.bin_file.exists():  # not after the test that stops the cluster
        k.run("delete", "namespace", name, "--wait=false", check=False)


def pod_named(kubectl: Kubectl, prefix: str) -> dict:
    pods = [p for p in kubectl.json("get", "pods")["items"] if p["metadata"]["name"].startswith(prefix)]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def phase_of(kubectl: Kubectl, pod: str) -> str:
    return kubectl.json("get", "pod", pod).get("status", {}).get("phase", "")


def log_of(bed: Testbed, pod: dict, container: str, restart: int = 0) -> str:
    path = container_log(bed.agent_dir, pod, container, restart)
    return path.read_text() if path.exists() else ""


def one_shot_pod(name: str, script: str, env_from_secret: str | None = None) -> str:
    """A restartPolicy Never pod running `python3 -c script`."""
    env_from = f"envFrom: [{{secretRef: {{name: {env_from_secret}}}}}]" if env_from_secret else ""
    return textwrap.dedent(f"""
        apiVersion: v1
        kind: Pod
        metadata: {{name: {name}}}
        spec:
          restartPolicy: Never
          containers:
          - name: main
            image: python:3.11-slim
            command: [python3, -c]
            args: [{json.dumps(script)}]
            {env_from}
        """)


def test_job_gets_secret_env_and_configmap_file_and_succeeds(bed: Testbed, kubectl: Kubectl) -> None:
    kubectl.apply(textwrap.dedent("""
        apiVersion: v1
        kind: Secret
        metadata: {name: site-credentials}
        stringData: {API_TOKEN: s3cr3t-token}
        ---
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: site-config}
        data: {greeting.txt: hello from a ConfigMap}
        ---
        apiVersion: batch/v1
        kind: Job
        metadata: {name: greet}
        spec:
          backoffLimit: 0
          template:
            spec:
              restartPolicy: Never
              nodeSelector: {pollinate.dev/site: hospital-b}
              containers:
              - name: main
                image: python:3.11-slim
                command: [python3, -c]
                args:
                - |
                  import os, socket
                  print("token:", os.environ["API_TOKEN"])
                  print("greeting:", open("/etc/pollinate-test/greeting.txt").read())
                  print("hostname:", socket.gethostname(), "pod:", os.environ["POD_NAME"])
                env:
                - {name: API_TOKEN, valueFrom: {secretKeyRef: {name: site-credentials, key: API_TOKEN}}}
                - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
                volumeMounts: [{name: config, mountPath: /etc/pollinate-test}]
              volumes: [{name: config, configMap: {name: site-config}}]
        """))

    def complete() -> bool:
        conditions = kubectl.json("get", "job", "greet").get("status", {}).get("conditions", [])
        return any(c["type"] == "Complete" and c["status"] == "True" for c in conditions)

    eventually(complete, timeout=60, what="Job greet Complete")
    pod = pod_named(kubectl, "greet-")
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["spec"]["nodeName"].startswith("gpu-hospital-b-")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    assert ipaddress.ip_address(pod["status"]["podIP"]) in bed.network.pod_cidr
    output = log_of(bed, pod, "main")
    assert "token: s3cr3t-token" in output
    assert "greeting: hello from a ConfigMap" in output
    assert f"hostname: {pod['metadata']['name']} pod: {pod['metadata']['name']}" in output
    # The ConfigMap was mounted in the pod's own mount namespace, never on the host.
    assert not Path("/etc/pollinate-test/greeting.txt").exists()


def test_deployment_is_available_only_once_its_probe_passes_and_is_reached_by_service_name(
        bed: Testbed, kubectl: Kubectl) -> None:
    kubectl.apply(textwrap.dedent("""
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web}
        spec:
          replicas: 1
          selector: {matchLabels: {app: web}}
          template:
            metadata: {labels: {app: web}}
            spec:
              containers:
              - name: http
                image: python:3.11-slim
                # Serves at once, but /ready exists only after 3 s: until then the probe fails.
                command: [sh, -c, '(sleep 3; echo ok > /srv/ready) &
                                   exec python3 -m http.server 8080 --directory /srv']
                ports: [{name: http, containerPort: 8080}]
                readinessProbe:
                  httpGet: {path: /ready, port: http, scheme: HTTP}
                  periodSeconds: 1
                volumeMounts: [{name: content, mountPath: /srv}]
              volumes: [{name: content, emptyDir: {}}]
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: web}
        spec:
          selector: {app: web}
          ports: [{name: http, port: 80, targetPort: http}]
        """))

    def running_but_unready() -> dict | None:
        pods = kubectl.json("get", "pods", "-l", "app=web")["items"]
        if pods and pods[0]["status"].get("phase") == "Running":
            return pods[0]
        return None

    pod = eventually(running_but_unready, timeout=30, what="web pod Running")
    ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False", "Ready before the readiness probe could pass"
    available = kubectl.json("get", "deployment", "web")["status"].get("availableReplicas", 0)
    assert available == 0

    def deployment_available() -> bool:
        conditions = kubectl.json("get", "deployment", "web")["status"].get("conditions", [])
        return any(c["type"] == "Available" and c["status"] == "True" for c in conditions)

    eventually(deployment_available, timeout=30, what="Deployment web Available")

    ns = kubectl.namespace
    kubectl.apply(one_shot_pod("client", textwrap.dedent(f"""
        import urllib.request
        for url in ("http://web/ready", "http://web.{ns}.svc.cluster.local:80/ready"):
            print(url, urllib.request.urlopen(url, timeout=5).read().decode().strip())
        """)))
    eventually(lambda: phase_of(kubectl, "client") in ("Succeeded", "Failed"), timeout=30,
               what="client pod finished")
    client = kubectl.json("get", "pod", "client")
    output = log_of(bed, client, "main")
    assert client["status"]["phase"] == "Succeeded", output
    assert "http://web/ready ok" in output
    assert f"http://web.{ns}.svc.cluster.local:80/ready ok" in output


def test_pod_exiting_3_with_restart_policy_never_fails_with_exit_code_3(
        bed: Testbed, kubectl: Kubectl) -> None:
    kubectl.apply(one_shot_pod("exit-3", "import sys; print('giving up'); sys.exit(3)"))
    eventually(lambda: phase_of(kubectl, "exit-3") == "Failed", timeout=30, what="pod Failed")
    pod = kubectl.json("get", "pod", "exit-3")
    status = pod["status"]["containerStatuses"][0]
    assert status["state"]["terminated"]["exitCode"] == 3
    assert status["state"]["terminated"]["reason"] == "Error"
    assert status["restartCount"] == 0
    assert "giving up" in log_of(bed, pod, "main")
    # The same log through the API server and the agent's kubelet API.
    assert "giving up" in kubectl.run("logs", "exit-3").stdout


def test_command_not_on_path_fails_with_start_error(kubectl: Kubectl) -> None:
    kubectl.apply(textwrap.dedent("""
        apiVersion: v1
        kind: Pod
        metadata: {name: no-such-command}
        spec:
          restartPolicy: Never
          containers: [{name: main, image: busybox, command: [no-such-command-anywhere]}]
        """))
    eventually(lambda: phase_of(kubectl, "no-such-command") == "Failed", timeout=30, what="pod Failed")
    terminated = kubectl.json("get", "pod", "no-such-command")["status"]["containerStatuses"][0]["state"][
        "terminated"]
    assert terminated["reason"] == "StartError"
    assert terminated["exitCode"] == 128
    assert "executable file not found" in terminated["message"]


def wait_for_pid(bed: Testbed, kubectl: Kubectl, pod_name: str) -> int:
    """The pid the pod's shell printed first in its log: its main process."""
    def pid() -> int | None:
        pod = kubectl.json("get", "pod", pod_name)
        if pod.get("status", {}).get("phase") != "Running":
            return None
        found = re.search(r"pid (\d+)", log_of(bed, pod, "main"))
        return int(found.group(1)) if found else None

    return eventually(pid, timeout=30, what=f"pod {pod_name} running and logging its pid")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # Reaped or a zombie on its way out: not running any more.
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


def sleeping_pod(name: str, grace: int, ignore_sigterm: bool = False) -> str:
    """A pod that logs its pid, then sleeps for an hour."""
    script = "import os, signal, time\n"
    if ignore_sigterm:
        script += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    script += "print('pid', os.getpid(), flush=True)\ntime.sleep(3600)\n"
    return textwrap.dedent(f"""
        apiVersion: v1
        kind: Pod
        metadata: {{name: {name}}}
        spec:
          terminationGracePeriodSeconds: {grace}
          containers:
          - name: main
            image: python:3.11-slim
            command: [python3, -c, {json.dumps(script)}]
        """)


def test_deleting_a_running_pod_terminates_its_process(bed: Testbed, kubectl: Kubectl) -> None:
    kubectl.apply(sleeping_pod("sleeper", grace=30))
    pid = wait_for_pid(bed, kubectl, "sleeper")
    assert alive(pid)
    t0 = time.monotonic()
    kubectl.run("delete", "pod", "sleeper", "--wait=true", "--timeout=60s")
    # SIGTERM ends it at once: no need to wait out the 30 s grace period.
    assert time.monotonic() - t0 < 15
    assert not alive(pid)
    assert kubectl.run("get", "pod", "sleeper", check=False).returncode != 0


def test_process_ignoring_sigterm_is_killed_after_the_grace_period(bed: Testbed, kubectl: Kubectl) -> None:
    kubectl.apply(sleeping_pod("stubborn", grace=2, ignore_sigterm=True))
    pid = wait_for_pid(bed, kubectl, "stubborn")
    t0 = time.monotonic()
    kubectl.run("delete", "pod", "stubborn", "--wait=true", "--timeout=60s")
    elapsed = time.monotonic() - t0
    assert 2 <= elapsed < 15, f"deleted after {elapsed:.1f} s, grace period 2 s"
    assert not alive(pid)


def test_failing_liveness_probe_restarts_the_container(bed: Testbed, kubectl: Kubectl) -> None:
    kubectl.apply(textwrap.dedent("""
        apiVersion: v1
        kind: Pod
        metadata: {name: flaky}
        spec:
          terminationGracePeriodSeconds: 1
          containers:
          - name: main
            image: busybox
            # Healthy for 3 s per run, then the liveness file goes away.
            command: [sh, -c, 'touch /state/alive; sleep 3; rm /state/alive; exec sleep 3600']
            livenessProbe:
              exec: {command: [cat, /state/alive]}
              initialDelaySeconds: 1
              periodSeconds: 1
              failureThreshold: 2
            volumeMounts: [{name: state, mountPath: /state}]
          volumes: [{name: state, emptyDir: {}}]
        """))

    def restarted() -> dict | None:
        statuses = kubectl.json("get", "pod", "flaky").get("status", {}).get("containerStatuses", [])
        return statuses[0] if statuses and statuses[0]["restartCount"] >= 1 else None

    status = eventually(restarted, timeout=45, what="container restarted by its liveness probe")
    killed = status["lastState"]["terminated"]
    assert killed["exitCode"] in (137, 143)  # SIGKILL or SIGTERM, as the runtime reports them
    ran = dt.datetime.fromisoformat(killed["finishedAt"]) - dt.datetime.fromisoformat(killed["startedAt"])
    assert ran >= dt.timedelta(seconds=3), f"killed after {ran}, while it was still healthy"
    assert phase_of(kubectl, "flaky") == "Running"
    pod = kubectl.json("get", "pod", "flaky")
    # Each run writes its own log file, as kubelet's <restart count>.log.
    assert container_log(bed.agent_dir, pod, "main", 0).exists()
    assert container_log(bed.agent_dir, pod, "main", 1).exists()


def test_pod_with_service_account_token_can_get_api(bed: Testbed, kubectl: Kubectl) -> None:
    kubectl.apply(one_shot_pod("in-cluster", textwrap.dedent("""
        import os, ssl, urllib.request
        d = "/var/run/secrets/kubernetes.io/serviceaccount"
        token = open(f"{d}/token").read()
        ctx = ssl.create_default_context(cafile=f"{d}/ca.crt")
        url = f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}/api"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        print("api:", urllib.request.urlopen(request, context=ctx).read().decode())
        print("namespace:", open(f"{d}/namespace").read())
        from kubernetes import client, config
        config.load_incluster_config()
        print("version:", client.VersionApi().get_code().git_version)
        """)))
    # The pod's first import of the kubernetes client may compile it (uv installs without
    # bytecode): over a minute on a CI machine busy with the other lanes (seen in CI).
    eventually(lambda: phase_of(kubectl, "in-cluster") in ("Succeeded", "Failed"), timeout=300,
               what="in-cluster pod finished")
    pod = kubectl.json("get", "pod", "in-cluster")
    output = log_of(bed, pod, "main")
    assert pod["status"]["phase"] == "Succeeded", output
    assert '"kind":"APIVersions"' in output
    assert f"namespace: {kubectl.namespace}" in output
    assert "version: v1.35." in output


def test_pod_reaches_s3_through_the_s3_service(bed: Testbed, kubectl: Kubectl) -> None:
    s3 = bed.s3()
    key = f"from-pod/{kubectl.namespace}.txt"
    create_s3_secret(kubectl)
    kubectl.apply(one_shot_pod("s3-writer", textwrap.dedent(f"""
        import boto3
        s3 = boto3.client("s3", endpoint_url="{IN_CLUSTER_S3_ENDPOINT}", region_name="{s3.region}")
        s3.put_object(Bucket="{s3.bucket}", Key="{key}", Body=b"written inside a pod")
        print("stored")
        """), env_from_secret="s3-credentials"))
    # boto3's first import may compile it, as the kubernetes client's above.
    eventually(lambda: phase_of(kubectl, "s3-writer") in ("Succeeded", "Failed"), timeout=180,
               what="s3-writer pod finished")
    pod = kubectl.json("get", "pod", "s3-writer")
    assert pod["status"]["phase"] == "Succeeded", log_of(bed, pod, "main")
    body = bed.s3_client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    assert body == b"written inside a pod"


HTTPS_ECHO = """
import http.server, ssl
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"echo {self.path}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
server = http.server.HTTPServer(("0.0.0.0", 8443), Echo)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain("/tls/tls.crt", "/tls/tls.key")
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""

FETCH = """
import sys, urllib.error, urllib.request, ssl
context = ssl.create_default_context(cafile=sys.argv[1])
try:
    with urllib.request.urlopen(sys.argv[2], context=context, timeout=10) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode(errors="replace"))
except urllib.error.URLError as e:
    print("unreachable", e.reason)
"""


def test_an_ingress_is_served_over_https_to_a_machine_outside_the_cluster(
        bed: Testbed, kubectl: Kubectl, tmp_path: Path) -> None:
    """The testbed's ingress controller (Traefik reading ingress-nginx annotations) serves an
    Ingress of class nginx: TLS with the Ingress's Secret for its host, re-encrypted to an
    HTTPS backend whose certificate it verifies against the CA named by the annotations, only
    on the paths the Ingress lists, and the address in the Ingress's status is where a
    laptop whose DNS knows the host reaches it."""
    ns, host = kubectl.namespace, "echo.pollinate.localhost"
    ca = pki.make_ca(tmp_path, "echo-ca")
    cert = pki.issue(ca, tmp_path, "echo", "echo", server=True, dns_names=(host, f"echo.{ns}.svc"))
    kubectl.run("create", "secret", "generic", "echo-tls", f"--from-file=tls.crt={cert.cert}",
                f"--from-file=tls.key={cert.key}", f"--from-file=ca.crt={ca.cert}")
    kubectl.apply(textwrap.dedent(f"""
        apiVersion: apps/v1
        kind: Deployment
        metadata: {{name: echo}}
        spec:
          selector: {{matchLabels: {{app: echo}}}}
          template:
            metadata: {{labels: {{app: echo}}}}
            spec:
              containers:
              - name: https
                image: python:3.11-slim
                command: [python3, -c, {json.dumps(HTTPS_ECHO)}]
                ports: [{{name: https, containerPort: 8443}}]
                readinessProbe: {{tcpSocket: {{port: https}}, periodSeconds: 1}}
                volumeMounts: [{{name: tls, mountPath: /tls}}]
              volumes: [{{name: tls, secret: {{secretName: echo-tls}}}}]
        ---
        apiVersion: v1
        kind: Service
        metadata: {{name: echo}}
        spec:
          selector: {{app: echo}}
          ports: [{{name: https, port: 8443, targetPort: https}}]
        ---
        apiVersion: networking.k8s.io/v1
        kind: Ingress
        metadata:
          name: echo
          annotations:
            nginx.ingress.kubernetes.io/backend-protocol: HTTPS
            nginx.ingress.kubernetes.io/proxy-ssl-verify: "on"
            nginx.ingress.kubernetes.io/proxy-ssl-secret: {ns}/echo-tls
            nginx.ingress.kubernetes.io/proxy-ssl-name: echo.{ns}.svc
        spec:
          ingressClassName: nginx
          tls: [{{hosts: [{host}], secretName: echo-tls}}]
          rules:
          - host: {host}
            http:
              paths:
              - path: /v1/fleet
                pathType: Prefix
                backend: {{service: {{name: echo, port: {{number: 8443}}}}}}
        """))

    def published_address() -> str | None:
        lb = kubectl.json("get", "ingress", "echo").get("status", {}).get("loadBalancer", {})
        return (lb.get("ingress") or [{}])[0].get("ip")

    address = eventually(published_address, timeout=60, what="the Ingress's address in its status")
    assert address == bed.ingress_address

    with OutsideHost(bed.network, {host: address}) as laptop:
        def fetch_url(url: str) -> str:
            argv = laptop.command([sys.executable, "-c", FETCH, str(ca.cert), url])
            return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.strip()

        def fetch(path: str) -> str:
            return fetch_url(f"https://{host}{path}")

        def status_of(path: str) -> str:
            return (fetch(path).split() or [""])[0]

        assert eventually(lambda: fetch("/v1/fleet/ping") == "200 echo /v1/fleet/ping" or None,
                          timeout=60, what="the backend through the ingress")
        # Not paths of the Ingress: the backend, which answers every path, never sees them.
        assert status_of("/v1/control/list-runs") == "404"
        assert status_of("/v1/runtime/get-nodes") == "404"
        # Only TLS: plain HTTP to the HTTPS port gets an error and never the backend, and no
        # plain HTTP port is open at all.
        plain = fetch_url(f"http://{host}:443/v1/fleet/ping")
        assert (plain.split() or [""])[0] in ("400", "404") and "echo" not in plain, plain
        assert fetch_url(f"http://{host}/v1/fleet/ping").startswith("unreachable"), "port 80 is open"

        # The backend's certificate is verified: a name it does not carry is refused.
        kubectl.run("annotate", "--overwrite", "ingress", "echo",
                    "nginx.ingress.kubernetes.io/proxy-ssl-name=not-the-backend.example")
        assert eventually(lambda: status_of("/v1/fleet/ping") in ("500", "502") or None, timeout=60,
                          what="the ingress refusing a backend whose name does not match")


def test_down_leaves_no_network_namespace_veth_or_process_behind(bed: Testbed, kubectl: Kubectl) -> None:
    kubectl.apply(sleeping_pod("left-running", grace=30))
    pid = wait_for_pid(bed, kubectl, "left-running")
    network = HostNetwork(bed.network)
    assert network.namespaces() and network.veths() and network.bridge_exists()

    bed.down(quiet=True)

    assert not alive(pid)
    assert network.namespaces() == []
    assert network.veths() == []
    assert not network.bridge_exists()
    assert not list(Path("/etc/netns").glob(f"{bed.network.netns_prefix}*"))
    agents = [p for p in Path("/proc").glob("[0-9]*")
              if b"pollinate_testbed.node_agent" in _cmdline(p)
              and str(bed.state_dir).encode() in _cmdline(p)]
    assert agents == []


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
