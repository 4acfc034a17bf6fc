"""Manifest builders: spec in, Kubernetes objects out."""

from __future__ import annotations

import base64

import pytest
from pollinate_operator.api import FederationSpec, TrainingRoundSpec
from pollinate_operator.manifests import clients, names, run, secrets, server
from pollinate_operator.manifests.security import owner_reference
from pollinate_operator.settings import Settings

SETTINGS = Settings()


def test_server_deployment_is_one_recreated_hardened_superlink(fed_spec: FederationSpec) -> None:
    dep = server.deployment("clinical-notes", "research", fed_spec, SETTINGS, "abc")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    (c,) = pod["containers"]
    assert c["command"] == ["pollinate-superlink"]
    assert "--enable-supernode-auth" in c["args"]
    assert "--disable-runtime-dependency-installation" in c["args"]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]}}
    # Writable places Flower needs, on a read-only root filesystem.
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", server.STATE_DIR, server.TLS_DIR} <= mounts
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "flower", "scheme": "HTTPS"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "flower", "scheme": "HTTPS"}
    # A slow start is not a dead server: liveness gives it longer than readiness does.
    assert c["livenessProbe"]["initialDelaySeconds"] > c["readinessProbe"]["initialDelaySeconds"]
    assert c["resources"] == server.DEFAULT_RESOURCES
    assert c["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["pollinate.dev/server-certificate"] == "abc"


def test_the_server_checks_control_calls_against_the_operators_token(fed_spec: FederationSpec) -> None:
    dep = server.deployment("clinical-notes", "research", fed_spec, SETTINGS, "abc")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    token_file = env["POLLINATE_CONTROL_TOKEN_FILE"]
    (mount,) = [m for m in c["volumeMounts"] if token_file.startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == names.control_token_secret("clinical-notes")
    assert volume["secret"]["defaultMode"] == 0o400
    assert [f"{mount['mountPath']}/{i['path']}" for i in volume["secret"]["items"]] == [token_file]


def test_each_control_token_is_new_and_stored_in_the_federations_secret() -> None:
    tokens = {secrets.new_control_token() for _ in range(50)}
    assert len(tokens) == 50 and all(len(t) >= 40 for t in tokens)
    body = secrets.control_token_secret("clinical-notes", "research", "t0k3n")
    assert body["metadata"]["name"] == "clinical-notes-control-token"
    assert body["metadata"]["labels"][names.FEDERATION_LABEL] == "clinical-notes"
    assert base64.b64decode(body["data"][secrets.CONTROL_TOKEN_KEY]) == b"t0k3n"


def test_node_authentication_off_drops_the_flag(fed_spec: FederationSpec) -> None:
    spec = fed_spec.model_copy(update={"server": fed_spec.server.model_copy(
        update={"node_authentication": False})})
    assert "--enable-supernode-auth" not in server.superlink_args(spec, 9092)


def test_service_has_one_port_for_every_flower_api(fed_spec: FederationSpec) -> None:
    svc = server.service("clinical-notes", "research", SETTINGS)
    assert [p["port"] for p in svc["spec"]["ports"]] == [SETTINGS.flower_port]
    assert svc["spec"]["selector"] == names.server_selector("clinical-notes")


def test_ingress_exposes_only_the_fleet_path_over_tls(fed_spec: FederationSpec) -> None:
    ing = server.ingress("clinical-notes", "research", fed_spec, SETTINGS)
    assert ing is not None
    (rule,) = ing["spec"]["rules"]
    assert rule["host"] == "fl.pollinate.localhost"
    assert [p["path"] for p in rule["http"]["paths"]] == ["/v1/fleet"]
    assert ing["spec"]["tls"] == [{"hosts": ["fl.pollinate.localhost"],
                                   "secretName": "clinical-notes-server-tls"}]
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"


def test_ingress_verifies_the_servers_certificate_against_the_federations_ca(
        fed_spec: FederationSpec) -> None:
    ing = server.ingress("clinical-notes", "research", fed_spec, SETTINGS)
    assert ing is not None
    notes = ing["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-ssl-verify"] == "on"
    assert notes["nginx.ingress.kubernetes.io/proxy-ssl-secret"] == "research/clinical-notes-server-tls"
    # The name it verifies is one the server certificate carries.
    name = notes["nginx.ingress.kubernetes.io/proxy-ssl-name"]
    assert name in server.tls_dns_names("clinical-notes", "research", fed_spec)


def test_a_federations_annotations_cannot_turn_off_the_verified_hop_but_may_tune(
        fed_spec: FederationSpec) -> None:
    ingress = fed_spec.server.ingress.model_copy(update={"annotations": {
        "nginx.ingress.kubernetes.io/proxy-ssl-verify": "off",
        "nginx.ingress.kubernetes.io/backend-protocol": "HTTP",
        "nginx.ingress.kubernetes.io/proxy-body-size": "256m",
        "cert-manager.io/cluster-issuer": "letsencrypt"}})
    spec = fed_spec.model_copy(update={"server": fed_spec.server.model_copy(update={"ingress": ingress})})
    ing = server.ingress("clinical-notes", "research", spec, SETTINGS)
    assert ing is not None
    notes = ing["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-ssl-verify"] == "on"
    assert notes["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"
    assert notes["nginx.ingress.kubernetes.io/proxy-body-size"] == "256m"
    assert notes["cert-manager.io/cluster-issuer"] == "letsencrypt"


def test_the_ingress_presents_the_users_server_certificate_when_there_is_one(
        fed_spec: FederationSpec) -> None:
    tls = fed_spec.server.tls.model_copy(update={"secret_name": "corp-issued"})
    spec = fed_spec.model_copy(update={"server": fed_spec.server.model_copy(update={"tls": tls})})
    ing = server.ingress("clinical-notes", "research", spec, SETTINGS)
    assert ing is not None
    assert ing["spec"]["tls"][0]["secretName"] == "corp-issued"
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-ssl-secret"] == \
        "research/corp-issued"


def test_no_ingress_without_a_host(fed_spec: FederationSpec) -> None:
    spec = fed_spec.model_copy(update={"server": fed_spec.server.model_copy(update={"ingress": None})})
    assert server.ingress("x", "ns", spec, SETTINGS) is None
    kinds = [o["kind"] for o in server.server_objects("x", "ns", spec, SETTINGS)]
    assert kinds == ["Deployment", "Service", "NetworkPolicy"]
    assert server.external_endpoint(spec) is None


def test_network_policy_admits_only_ingress_clients_and_operator() -> None:
    policy = server.network_policy("clinical-notes", "research", SETTINGS)
    assert policy["spec"]["podSelector"] == {"matchLabels": names.server_selector("clinical-notes")}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 9092, "protocol": "TCP"}]
    # Exactly these peers: one more would open the control API to it.
    # Each peer from another namespace is pinned to that namespace by the label only the API
    # server sets: never `namespaceSelector: {}`, which any namespace's pod with the labels meets.
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}},
        {"podSelector": {"matchLabels": {
            "pollinate.dev/federation": "clinical-notes", "app.kubernetes.io/component": "site-client"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "pollinate-system"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "pollinate-operator"}}},
    ]


def test_the_network_policy_follows_the_operators_settings(monkeypatch) -> None:
    monkeypatch.setenv("POLLINATE_INGRESS_CONTROLLER_NAMESPACE", "traefik")
    monkeypatch.setenv("POLLINATE_INGRESS_CONTROLLER_LABELS", "app.kubernetes.io/name=traefik, tier=edge")
    monkeypatch.setenv("POLLINATE_OPERATOR_NAMESPACE", "hub")
    (rule,) = server.network_policy("f", "research", Settings.from_env())["spec"]["ingress"]
    ingress, _, operator = rule["from"]
    assert ingress == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "traefik"}},
                       "podSelector": {"matchLabels": {"app.kubernetes.io/name": "traefik", "tier": "edge"}}}
    assert operator["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "hub"}}
    monkeypatch.setenv("POLLINATE_INGRESS_CONTROLLER_LABELS", "traefik")
    with pytest.raises(ValueError, match="POLLINATE_INGRESS_CONTROLLER_LABELS: 'traefik' is not key=value"):
        Settings.from_env()


def test_only_the_named_scraper_may_reach_the_servers_metrics_port(monkeypatch, fed_spec) -> None:
    # By default nobody: the policy has the Flower port's rule only (checked above).
    assert len(server.network_policy("f", "research", SETTINGS)["spec"]["ingress"]) == 1
    monkeypatch.setenv("POLLINATE_METRICS_SCRAPER_NAMESPACE", "monitoring")
    monkeypatch.setenv("POLLINATE_METRICS_SCRAPER_LABELS", "app.kubernetes.io/name=prometheus")
    settings = Settings.from_env()
    flower, metrics = server.network_policy("f", "research", settings)["spec"]["ingress"]
    assert metrics == {
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
        "ports": [{"port": 9190, "protocol": "TCP"}]}
    assert flower["ports"] == [{"port": 9092, "protocol": "TCP"}]  # the scraper is not a peer of Flower's
    # The server serves its counters there, summed over its processes, and says so to Prometheus.
    pod = server.deployment("f", "research", fed_spec, settings)["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["POLLINATE_METRICS_ADDRESS"] == "0.0.0.0:9190"
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")  # the pod's writable emptyDir
    assert {"name": "metrics", "containerPort": 9190, "protocol": "TCP"} in container["ports"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9190"
    # The Service (and so the Ingress) carries Flower's port only.
    assert [p["port"] for p in server.service("f", "research", settings)["spec"]["ports"]] == [9092]


def test_server_certificate_names_cover_ingress_and_service(fed_spec: FederationSpec) -> None:
    dns = server.tls_dns_names("clinical-notes", "research", fed_spec)
    assert dns[0] == "fl.pollinate.localhost"
    assert "clinical-notes-server.research.svc" in dns
    assert "clinical-notes-server.research.svc.cluster.local" in dns


def test_client_job_is_pinned_to_its_site_with_its_identity(
        fed_spec: FederationSpec, tr_spec: TrainingRoundSpec) -> None:
    site = fed_spec.site("hospital-b")
    job = clients.client_job("notes-v1", "research", tr_spec, "clinical-notes", fed_spec, site,
                             "clinical-notes-server.research.svc:9092")
    assert job["metadata"]["name"] == "notes-v1-hospital-b"
    assert job["spec"]["backoffLimit"] == 2
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pollinate.dev/site": "hospital-b"}
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 1}, "requests": {"cpu": "1"}}
    assert c["command"] == ["pollinate-client"]
    assert c["args"][:3] == ["join", "--server=clinical-notes-server.research.svc:9092", "--site=hospital-b"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["site-identity"]["secret"]["secretName"] == "clinical-notes-site-hospital-b"
    assert volumes["data"]["configMap"] == {"name": "hospital-b-notes"}
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["pollinate.dev/site"] == "hospital-b"
    assert "envFrom" not in c  # no S3 credentials unless the base model is in S3


@pytest.mark.parametrize(("resources", "field"), [
    ({"limits": {"cpu": "2"}, "requests": {"cpu": "1"}}, "limits.cpu"),
    ({"limits": {"nvidia.com/gpu": 1}, "requests": {"cpu": "1"}}, "requests.cpu"),
    ({"limits": {"nvidia.com/gpu": 1}}, None),
    (None, None),
])
def test_the_site_is_told_its_cpu_limit_else_its_request(
        fed_spec: FederationSpec, tr_spec: TrainingRoundSpec, resources, field) -> None:
    wire = fed_spec.to_wire()
    wire["sites"][0] = {**wire["sites"][0], "resources": resources}
    fed = FederationSpec.model_validate(wire)
    job = clients.client_job("notes-v1", "research", tr_spec, "clinical-notes", fed, fed.sites[0], "s:9092")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    budget = [e for e in c["env"] if e["name"] == clients.CPU_MILLICORES_ENV]
    if field is None:
        assert budget == []  # the runtime uses the cgroup quota and the CPUs it may run on
    else:
        assert budget == [{"name": "POLLINATE_CPU_MILLICORES", "valueFrom": {"resourceFieldRef": {
            "containerName": c["name"], "resource": field, "divisor": "1m"}}}]


def test_general_evaluation_text_is_mounted_and_passed_to_every_site(
        fed_spec: FederationSpec, tr_spec: TrainingRoundSpec) -> None:
    assert "--general-eval" not in " ".join(clients.client_args(fed_spec.site("hospital-a"), "s:9092"))
    general = {"configMap": {"name": "general-text"}, "path": "heldout.txt"}
    fed = FederationSpec.model_validate({**fed_spec.to_wire(), "generalEvaluation": general})
    job = clients.client_job("notes-v1", "research", tr_spec, "clinical-notes", fed,
                             fed.site("hospital-a"), "s:9092")
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert "--general-eval=/general/heldout.txt" in c["args"]
    assert {"name": "general", "mountPath": "/general", "readOnly": True} in c["volumeMounts"]
    assert {"name": "general", "configMap": {"name": "general-text"}} in pod["volumes"]


def test_job_names_stay_short_enough_for_pod_labels() -> None:
    name = names.client_job("a" * 60, "hospital-a")
    assert len(name) <= 52 and not name.endswith("-")


def test_run_config_carries_the_whole_training_round(
        fed_spec: FederationSpec, tr_spec: TrainingRoundSpec) -> None:
    config = run.run_config("notes-v1", "research", tr_spec, "clinical-notes", fed_spec,
                            uid="5e6f7a8b-0000-4000-8000-000000000002")
    assert config.run_key == "notes-v1-5e6f7a8b"  # a re-created TrainingRound is a new run
    assert config.sites == ("hospital-a", "hospital-b", "clinic-c")
    assert config.local_max_steps == 4 and config.local_epochs == 0
    assert config.s3_prefix == "clinical-notes"
    assert config.lora_rank == 8 and config.lora_target_modules == ("q_proj", "v_proj")
    flat = config.to_flower()
    assert flat["training-round"] == "notes-v1"
    assert flat["training-round-uid"] == "5e6f7a8b-0000-4000-8000-000000000002"
    assert type(config).from_flower(flat) == config


def test_run_names_the_node_of_each_taking_part_site_only(
        fed_spec: FederationSpec, tr_spec: TrainingRoundSpec) -> None:
    nodes = {"hospital-a": 18446744073709551557, "hospital-b": 2, "alice-laptop": 3}
    spec = TrainingRoundSpec.model_validate({**tr_spec.to_wire(), "sites": ["hospital-a", "alice-laptop"]})
    config = run.run_config("r", "ns", spec, "f", fed_spec, nodes)
    assert config.site_nodes == {"hospital-a": 18446744073709551557, "alice-laptop": 3}
    assert type(config).from_flower(config.to_flower()).site_nodes == config.site_nodes


@pytest.mark.parametrize(("strategy", "expected"), [
    ({"name": "fedprox", "mu": 0.1}, {"strategy": "fedprox", "fedprox_mu": 0.1}),
    ({"name": "fedadam", "serverLearningRate": 0.05}, {"strategy": "fedadam", "server_learning_rate": 0.05}),
    ({"name": "trimmedmean", "beta": 0.1}, {"strategy": "trimmedmean", "trim_beta": 0.1}),
    ({"name": "median"}, {"strategy": "median"}),
])
def test_strategy_parameters_reach_the_run(fed_spec: FederationSpec, tr_spec: TrainingRoundSpec,
                                           strategy: dict, expected: dict) -> None:
    spec = TrainingRoundSpec.model_validate({**tr_spec.to_wire(), "strategy": strategy})
    config = run.run_config("r", "ns", spec, "f", fed_spec)
    for key, value in expected.items():
        assert getattr(config, key) == value


def test_owner_reference_makes_the_federation_the_controller(federation_body: dict) -> None:
    ref = owner_reference(federation_body)
    assert ref == {"apiVersion": "pollinate.dev/v1alpha1", "kind": "Federation",
                   "name": "clinical-notes", "uid": "fed-uid", "controller": True,
                   "blockOwnerDeletion": True}


def test_server_resources_come_from_the_spec_when_given(fed_spec: FederationSpec) -> None:
    resources = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}
    spec = fed_spec.model_copy(update={"server": fed_spec.server.model_copy(update={"resources": resources})})
    (c,) = server.deployment("f", "ns", spec, SETTINGS)["spec"]["template"]["spec"]["containers"]
    assert c["resources"] == resources


def site_with(fed_spec: FederationSpec, name: str, **changes) -> FederationSpec:
    sites = [s.to_wire() | changes if s.name == name else s.to_wire() for s in fed_spec.sites]
    return FederationSpec.model_validate({**fed_spec.to_wire(), "sites": sites})


def job_for(fed: FederationSpec, tr_spec: TrainingRoundSpec, site: str = "hospital-a") -> dict:
    return clients.client_job("notes-v1", "research", tr_spec, "clinical-notes", fed, fed.site(site),
                              "clinical-notes-server.research.svc:9092")


def test_client_pod_runs_non_root_on_a_read_only_root_without_capabilities(
        fed_spec: FederationSpec, tr_spec: TrainingRoundSpec) -> None:
    pod = job_for(fed_spec, tr_spec)["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["automountServiceAccountToken"] is False
    (c,) = pod["containers"]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]}}
    assert "add" not in c["securityContext"]["capabilities"]
    # Writable places on the read-only root: its work dir and /tmp, both emptyDirs.
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = [m for m in c["volumeMounts"] if not m.get("readOnly")]
    assert {m["mountPath"] for m in writable} == {clients.WORK_DIR, "/tmp"}
    assert all(volumes[m["name"]] == {"name": m["name"], "emptyDir": {}} for m in writable)
    # The site's private key is readable by its owner only.
    assert volumes["site-identity"]["secret"]["defaultMode"] == 0o400


def test_a_sites_data_claim_is_mounted_read_only(
        fed_spec: FederationSpec, tr_spec: TrainingRoundSpec) -> None:
    fed = site_with(fed_spec, "hospital-a", data={"persistentVolumeClaim": {"claimName": "notes"},
                                                  "path": "2024/notes.jsonl"})
    job = job_for(fed, tr_spec)
    pod = job["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["data"] == {
        "name": "data", "persistentVolumeClaim": {"claimName": "notes", "readOnly": True}}
    (c,) = pod["containers"]
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in c["volumeMounts"]
    assert "--data=/data/2024/notes.jsonl" in c["args"]


def test_a_sites_host_path_must_be_an_existing_directory(
        fed_spec: FederationSpec, tr_spec: TrainingRoundSpec) -> None:
    fed = site_with(fed_spec, "hospital-a", data={"hostPath": {"path": "/srv/notes"}})
    pod = job_for(fed, tr_spec)["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["data"] == {
        "name": "data", "hostPath": {"path": "/srv/notes", "type": "Directory"}}
    assert "--data=/data" in pod["containers"][0]["args"]


def test_a_sites_tolerations_reach_its_pod(fed_spec: FederationSpec, tr_spec: TrainingRoundSpec) -> None:
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                   {"key": "pollinate.dev/site", "operator": "Equal", "value": "hospital-a",
                    "effect": "NoExecute"}]
    fed = site_with(fed_spec, "hospital-a", tolerations=tolerations)
    assert job_for(fed, tr_spec)["spec"]["template"]["spec"]["tolerations"] == tolerations
    assert "tolerations" not in job_for(fed, tr_spec, "hospital-b")["spec"]["template"]["spec"]


def test_a_base_model_in_s3_gives_the_client_the_bucket_credentials(
        fed_spec: FederationSpec, tr_spec: TrainingRoundSpec) -> None:
    fed = FederationSpec.model_validate({**fed_spec.to_wire(), "baseModel": {"uri": "s3://models/smollm2/"}})
    (c,) = job_for(fed, tr_spec)["spec"]["template"]["spec"]["containers"]
    assert c["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["POLLINATE_S3_ENDPOINT"] == "http://s3.pollinate-system.svc:9000"
    assert env["POLLINATE_SITE"] == "hospital-a" and env["HF_HUB_OFFLINE"] == "1"


def test_a_base_model_in_s3_without_an_endpoint_uses_aws(
        fed_spec: FederationSpec, tr_spec: TrainingRoundSpec) -> None:
    wire = fed_spec.to_wire()
    wire["storage"]["s3"].pop("endpoint")
    fed = FederationSpec.model_validate({**wire, "baseModel": {"uri": "s3://models/smollm2/"}})
    (c,) = job_for(fed, tr_spec)["spec"]["template"]["spec"]["containers"]
    assert c["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert "POLLINATE_S3_ENDPOINT" not in {e["name"] for e in c["env"]}


def test_general_evaluation_from_a_claim_is_mounted_read_only(
        fed_spec: FederationSpec, tr_spec: TrainingRoundSpec) -> None:
    general = {"persistentVolumeClaim": {"claimName": "heldout"}}
    fed = FederationSpec.model_validate({**fed_spec.to_wire(), "generalEvaluation": general})
    pod = job_for(fed, tr_spec)["spec"]["template"]["spec"]
    assert {"name": "general", "persistentVolumeClaim": {"claimName": "heldout", "readOnly": True}} \
        in pod["volumes"]
    assert "--general-eval=/general" in pod["containers"][0]["args"]


def test_run_config_carries_privacy_and_transport(
        fed_spec: FederationSpec, tr_spec: TrainingRoundSpec) -> None:
    spec = TrainingRoundSpec.model_validate({
        **tr_spec.to_wire(), "privacy": {"clippingNorm": 0.5, "noiseMultiplier": 1.1, "targetDelta": 1e-6},
        "transport": {"dtype": "float32", "maxUpdateNorm": 50}, "maxExamplesPerSite": 5000})
    config = run.run_config("r", "ns", spec, "f", fed_spec)
    flat = config.to_flower()
    assert type(config).from_flower(flat) == config
    assert (config.clipping_norm, config.noise_multiplier, config.target_delta) == (0.5, 1.1, 1e-6)
    assert (config.transport_dtype, config.max_update_norm) == ("float32", 50)
    assert config.max_examples_per_site == 5000
    default = run.run_config("r", "ns", tr_spec, "f", fed_spec)
    assert default.max_examples_per_site == 1_000_000
    assert (default.clipping_norm, default.noise_multiplier, default.transport_dtype) == (0.0, 0, "float16")
