"""The admission rules the operator repeats for a cluster without the hub chart's policy
(pollinate_operator/reconcile/admission.py); the API server's own policy is tested in
tests/integration/test_admission.py with the same wording."""

from __future__ import annotations

import json

import pytest
from pollinate_operator.api.federation import FederationSpec
from pollinate_operator.reconcile.admission import ENV, AdmissionPolicy, refusals

CHART_DEFAULTS = AdmissionPolicy(
    allowed_image_prefixes=("ghcr.io/pollinate-dev/",), allow_host_path=False,
    denied_ingress_annotations=("(?i)snippet", "/proxy-ssl-", "/backend-protocol$",
                                "^traefik\\.ingress\\.kubernetes\\.io/(router\\.middlewares)$"))


def changed(spec: FederationSpec, **server: object) -> FederationSpec:
    return spec.model_copy(update={"server": spec.server.model_copy(update=server)})


def test_the_example_passes_the_charts_defaults_and_no_policy_refuses_anything(fed_spec) -> None:
    assert refusals(fed_spec, CHART_DEFAULTS) == []
    hostile = changed(fed_spec, image="docker.io/mallory/x:1")
    assert refusals(hostile, AdmissionPolicy()) == []  # an operator run without the chart's values


def test_an_image_outside_the_prefixes_is_named(fed_spec) -> None:
    spec = changed(fed_spec, image="docker.io/mallory/superlink:latest")
    spec = spec.model_copy(update={"client_image": "ghcr.io/pollinate-dev.evil.example/client:1"})
    found = refusals(spec, CHART_DEFAULTS)
    assert found[0].startswith('spec.server.image: image "docker.io/mallory/superlink:latest" is not '
                               "under an allowed prefix (ghcr.io/pollinate-dev/;")
    assert found[1].startswith('spec.clientImage: image "ghcr.io/pollinate-dev.evil.example/client:1"')


def test_hostpath_data_is_named_by_site_unless_allowed(fed_spec) -> None:
    site = fed_spec.sites[0]
    data = site.data.model_validate({"hostPath": {"path": "/etc/kubernetes"}})
    sites = [site.model_copy(update={"data": data}), *fed_spec.sites[1:]]
    spec = fed_spec.model_copy(update={"sites": sites})
    (found,) = refusals(spec, CHART_DEFAULTS)
    assert found.startswith(f"spec.sites[{site.name}].data.hostPath: hostPath data is not allowed")
    allowing = AdmissionPolicy(CHART_DEFAULTS.allowed_image_prefixes, True,
                               CHART_DEFAULTS.denied_ingress_annotations)
    assert refusals(spec, allowing) == []


def test_denied_ingress_annotations_are_named_and_others_pass(fed_spec) -> None:
    ingress = fed_spec.server.ingress.model_copy(update={"annotations": {
        "nginx.ingress.kubernetes.io/server-snippet": "x",
        "nginx.ingress.kubernetes.io/proxy-ssl-verify": "off",
        "traefik.ingress.kubernetes.io/router.middlewares": "ns-strip@kubernetescrd",
        "cert-manager.io/cluster-issuer": "corp",
        "nginx.ingress.kubernetes.io/proxy-body-size": "256m"}})
    (found,) = refusals(changed(fed_spec, ingress=ingress), CHART_DEFAULTS)
    assert found == ('spec.server.ingress.annotations: "nginx.ingress.kubernetes.io/proxy-ssl-verify", '
                     '"nginx.ingress.kubernetes.io/server-snippet", '
                     '"traefik.ingress.kubernetes.io/router.middlewares" may not be set on the server '
                     "Ingress (the hub chart value admission.deniedIngressAnnotations)")


def test_the_charts_values_are_read_from_the_environment() -> None:
    text = json.dumps({"enabled": True, "allowedImagePrefixes": ["ghcr.io/pollinate-dev/"],
                       "allowHostPath": False, "deniedIngressAnnotations": ["(?i)snippet"]})
    assert AdmissionPolicy.from_json(text) == AdmissionPolicy(("ghcr.io/pollinate-dev/",), False,
                                                              ("(?i)snippet",))
    assert AdmissionPolicy.from_json("") == AdmissionPolicy()


@pytest.mark.parametrize("text", [
    "{", '{"allowedImagePrefixes": ["x"]}',
    '{"allowedImagePrefixes": "x", "allowHostPath": false, "deniedIngressAnnotations": []}',
    '{"allowedImagePrefixes": [], "allowHostPath": "no", "deniedIngressAnnotations": []}',
    '{"allowedImagePrefixes": [], "allowHostPath": false, "deniedIngressAnnotations": ["(unclosed"]}',
])
def test_bad_values_name_the_variable(text: str) -> None:
    with pytest.raises(ValueError, match=ENV):
        AdmissionPolicy.from_json(text)
