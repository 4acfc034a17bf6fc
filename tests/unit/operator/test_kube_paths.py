"""REST paths of the kinds the operator writes (a fixed table: no discovery of the cluster)."""

from __future__ import annotations

import pytest
from pollinate_operator.clients import kube
from pollinate_operator.manifests import clients, secrets, server
from pollinate_operator.settings import Settings


@pytest.mark.parametrize(("api_version", "kind", "expected"), [
    ("v1", "Secret", "/api/v1/namespaces/research/secrets/ca"),
    ("apps/v1", "Deployment", "/apis/apps/v1/namespaces/research/deployments/ca"),
    ("batch/v1", "Job", "/apis/batch/v1/namespaces/research/jobs/ca"),
    ("networking.k8s.io/v1", "Ingress", "/apis/networking.k8s.io/v1/namespaces/research/ingresses/ca"),
])
def test_object_paths(api_version, kind, expected):
    assert kube.path(api_version, kind, "research", "ca") == expected


def test_collection_path_has_no_name():
    assert kube.path("batch/v1", "Job", "research") == "/apis/batch/v1/namespaces/research/jobs"


def test_a_kind_outside_the_table_is_refused_by_name():
    with pytest.raises(ValueError, match="v1 ConfigMap is not a kind the operator writes"):
        kube.path("v1", "ConfigMap", "research", "x")


def test_every_kind_the_manifests_build_has_a_path(fed_spec, tr_spec):
    built = server.server_objects("clinical-notes", "research", fed_spec, Settings())
    built.append(secrets._secret("s", "research", "clinical-notes", {"a": b"b"}))
    site = fed_spec.sites[0]
    built.append(clients.client_job("notes-v1", "research", tr_spec, "clinical-notes", fed_spec, site,
                                    "clinical-notes-server.research.svc:9092"))
    for obj in built:
        kube.path(obj["apiVersion"], obj["kind"], "research", obj["metadata"]["name"])
