"""Federation decisions: TLS material, site keys and registrations, status."""

from __future__ import annotations

import datetime as dt

import pytest
from pollinate_operator.api import FederationSpec, FederationStatus
from pollinate_operator.api.federation import Site, SiteIdentity
from pollinate_operator.reconcile.federation import (
    FederationObserved,
    FlowerNode,
    StoredSiteKey,
    TLSObserved,
    federation_status,
    nodes_to_unregister,
    plan_tls,
    registered_sites,
    settled,
    site_key_action,
    sites_by_key,
    sites_needing_keys,
    sites_to_register,
    stale_sites,
)

DNS = ["fl.pollinate.localhost", "clinical-notes-server.research.svc"]
GOOD_NAMES = (frozenset(DNS), frozenset({"127.0.0.1"}))
KEYS = {s: f"pem-{s}".encode() for s in ("hospital-a", "hospital-b", "clinic-c", "alice-laptop")}


def observed(**overrides) -> FederationObserved:
    values = dict(generation=1, tls=TLSObserved(), site_keys=dict(KEYS), server_ready_replicas=1,
                  flower_nodes=[], previous=FederationStatus())
    values.update(overrides)
    return FederationObserved(**values)


NOW = dt.datetime(2026, 12, 8, 12, 0, tzinfo=dt.UTC)


def tls_observed(**changes) -> TLSObserved:
    """A CA and a server certificate it signed a month ago, good for eleven more months."""
    values = dict(ca_cert_pem=b"ca", ca_rotation=0, server_cert_names=GOOD_NAMES,
                  server_not_after=NOW + dt.timedelta(days=335), server_issuer="current")
    values.update(changes)
    return TLSObserved(**values)


def with_tls(spec: FederationSpec, **changes) -> FederationSpec:
    return spec.model_copy(update={"server": spec.server.model_copy(update={
        "tls": spec.server.tls.model_copy(update=changes)})})


def test_first_pass_generates_ca_and_certificate(fed_spec: FederationSpec) -> None:
    plan = plan_tls(fed_spec, TLSObserved(), DNS, NOW)
    assert plan.new_ca and plan.new_server_certificate and not plan.keep_previous_ca


def test_existing_material_is_kept(fed_spec: FederationSpec) -> None:
    plan = plan_tls(fed_spec, tls_observed(), DNS, NOW)
    assert not plan.new_ca and not plan.new_server_certificate and plan.why == ""


def test_a_new_ingress_host_reissues_only_the_certificate(fed_spec: FederationSpec) -> None:
    plan = plan_tls(fed_spec, tls_observed(), [*DNS, "new.example.org"], NOW)
    assert not plan.new_ca and plan.new_server_certificate and "new.example.org" in plan.why


def test_certificate_without_loopback_is_reissued(fed_spec: FederationSpec) -> None:
    tls = tls_observed(server_cert_names=(frozenset(DNS), frozenset()))
    assert plan_tls(fed_spec, tls, DNS, NOW).new_server_certificate


@pytest.mark.parametrize(("left", "renewed"), [
    (dt.timedelta(days=31), False), (dt.timedelta(days=30), True), (dt.timedelta(days=2), True),
    (-dt.timedelta(days=1), True),  # already expired (an operator that was down)
])
def test_the_server_certificate_is_renewed_renew_before_its_expiry(
        fed_spec: FederationSpec, left: dt.timedelta, renewed: bool) -> None:
    plan = plan_tls(fed_spec, tls_observed(server_not_after=NOW + left), DNS, NOW)  # 720h default
    assert plan.new_server_certificate is renewed and not plan.new_ca
    assert ("expires at" in plan.why) is renewed


def test_renew_before_and_duration_come_from_the_spec(fed_spec: FederationSpec) -> None:
    spec = with_tls(fed_spec, certificate_duration="5m", renew_before="3m")
    assert spec.server.tls.lifetime == dt.timedelta(minutes=5)
    fresh = tls_observed(server_not_after=NOW + dt.timedelta(minutes=4))
    assert not plan_tls(spec, fresh, DNS, NOW).new_server_certificate
    assert plan_tls(spec, fresh, DNS, NOW + dt.timedelta(minutes=1)).new_server_certificate


def test_a_rotation_keeps_the_old_ca_trusted_and_signing_for_the_overlap(fed_spec: FederationSpec) -> None:
    spec = with_tls(fed_spec, rotation=1)
    plan = plan_tls(spec, tls_observed(), DNS, NOW)
    # A new CA, the old one kept beside it, and the server keeps its certificate (the old CA's).
    assert plan.new_ca and plan.keep_previous_ca and not plan.new_server_certificate
    during = tls_observed(ca_rotation=1, previous_ca_cert_pem=b"old", ca_rotated_at=NOW,
                          server_issuer="previous")
    later = plan_tls(spec, during, DNS, NOW + dt.timedelta(days=6))
    assert not later.new_ca and later.keep_previous_ca and not later.new_server_certificate
    # A renewal inside the overlap is still the old CA's (the handler signs with it).
    expiring = plan_tls(spec, tls_observed(**{**during.__dict__, "server_not_after": NOW}), DNS, NOW)
    assert expiring.keep_previous_ca and expiring.new_server_certificate
    # Once the overlap (168h by default) is over, the server moves to the new CA and the old
    # one leaves the bundle.
    after = plan_tls(spec, during, DNS, NOW + dt.timedelta(hours=168))
    assert not after.new_ca and not after.keep_previous_ca and after.new_server_certificate
    assert after.why == "the server moves to the new CA"


def test_a_rotation_without_overlap_cuts_over_at_once(fed_spec: FederationSpec) -> None:
    plan = plan_tls(with_tls(fed_spec, rotation=1, ca_overlap="0s"), tls_observed(), DNS, NOW)
    assert plan.new_ca and plan.new_server_certificate and not plan.keep_previous_ca


def test_a_certificate_signed_by_neither_ca_is_reissued(fed_spec: FederationSpec) -> None:
    plan = plan_tls(fed_spec, tls_observed(server_issuer=None), DNS, NOW)
    assert plan.new_server_certificate and not plan.new_ca


def test_user_supplied_tls_is_never_generated(fed_spec: FederationSpec) -> None:
    plan = plan_tls(with_tls(fed_spec, secret_name="mine"), TLSObserved(), DNS, NOW)
    assert not plan.new_ca and not plan.new_server_certificate


@pytest.mark.parametrize("text", ["", "1d", "h", "5", "-5m", "1m30", "1.5h"])
def test_a_duration_that_is_not_one_is_refused_naming_the_field(text: str) -> None:
    from pollinate_operator.api.base import parse_duration

    with pytest.raises(ValueError, match=r"spec\.server\.tls\.renewBefore: .* is not a duration"):
        parse_duration(text, "spec.server.tls.renewBefore")


def test_every_site_without_a_key_gets_one(fed_spec: FederationSpec) -> None:
    obs = observed(site_keys={"hospital-a": b"k"})
    assert sites_needing_keys(fed_spec, obs) == ["hospital-b", "clinic-c", "alice-laptop"]


def test_registration_is_found_by_key_even_if_status_lost_it(fed_spec: FederationSpec) -> None:
    obs = observed(flower_nodes=[FlowerNode("11", "online", KEYS["hospital-a"]),
                                 FlowerNode("12", "unregistered", KEYS["hospital-b"])])
    assert registered_sites(obs) == {"hospital-a": "11"}
    assert sites_to_register(fed_spec, obs) == ["hospital-b", "clinic-c", "alice-laptop"]


def test_unreachable_server_trusts_the_recorded_status(fed_spec: FederationSpec) -> None:
    prev = FederationStatus(sites=[SiteIdentity(name="hospital-a", registered=True, node_id="11")])
    obs = observed(flower_nodes=None, previous=prev)
    assert registered_sites(obs) == {"hospital-a": "11"}
    assert sites_to_register(fed_spec, obs) == []


def test_a_site_removed_from_the_spec_is_unregistered_then_forgotten(fed_spec: FederationSpec) -> None:
    keys = {**KEYS, "old-site": b"pem-old"}
    obs = observed(site_keys=keys, flower_nodes=[FlowerNode("99", "online", b"pem-old", "old-site")])
    assert stale_sites(fed_spec, obs) == ["old-site"]
    assert nodes_to_unregister(fed_spec, obs) == {"99": "old-site"}


def test_every_key_that_is_not_a_current_site_key_is_unregistered(fed_spec: FederationSpec) -> None:
    nodes = [
        FlowerNode("11", "online", KEYS["hospital-a"], "hospital-a"),
        # hospital-b's key was rotated (its Secret deleted): the old key is still registered.
        FlowerNode("12", "online", b"pem-hospital-b-before-rotation", "hospital-b"),
        # Someone registered a key of their own under a site's name, and one under no name.
        FlowerNode("13", "registered", b"pem-intruder", "clinic-c"),
        FlowerNode("14", "offline", b"pem-unnamed", ""),
        FlowerNode("15", "unregistered", b"pem-gone", "old"),  # already done
    ]
    obs = observed(flower_nodes=nodes)
    assert nodes_to_unregister(fed_spec, obs) == {"12": "hospital-b", "13": "clinic-c", "14": ""}
    # The name an intruder chose maps nothing: clinic-c is still not registered.
    assert registered_sites(obs) == {"hospital-a": "11"}
    assert "clinic-c" in sites_to_register(fed_spec, obs)


def test_nothing_is_unregistered_without_node_authentication_or_a_server_answer(
        fed_spec: FederationSpec) -> None:
    nodes = [FlowerNode("13", "online", b"pem-intruder")]
    spec = fed_spec.model_copy(update={"server": fed_spec.server.model_copy(
        update={"node_authentication": False})})
    assert nodes_to_unregister(spec, observed(flower_nodes=nodes)) == {}
    assert nodes_to_unregister(fed_spec, observed(flower_nodes=None)) == {}


def test_sites_are_matched_to_nodes_by_key_never_by_name() -> None:
    nodes = [FlowerNode("1", "online", b"pem-a", "site-b"), FlowerNode("2", "online", b"pem-x", "site-a")]
    assert sites_by_key({"site-a": b"pem-a", "site-b": b"pem-b"}, nodes) == {"site-a": "1"}


CA, OTHER_CA = b"ca-pem", b"rotated-ca-pem"
GIVEN = "ecdsa-sha2-nistp384 AAAAgiven laptop"


@pytest.mark.parametrize("public_key, stored, action", [
    (None, None, "generate"),
    (None, StoredSiteKey(b"ecdsa-sha2-nistp384 AAAAours", True, CA), "keep"),
    (None, StoredSiteKey(b"ecdsa-sha2-nistp384 AAAAours", True, OTHER_CA), "refresh-ca"),
    # publicKey removed from the spec: the site gets a key of ours again.
    (None, StoredSiteKey(GIVEN.encode(), False, CA), "generate"),
    (GIVEN, None, "use-given"),
    (GIVEN, StoredSiteKey(GIVEN.encode(), False, CA), "keep"),
    (GIVEN + "\n", StoredSiteKey(GIVEN.encode(), False, CA), "keep"),
    (GIVEN, StoredSiteKey(GIVEN.encode(), False, OTHER_CA), "use-given"),
    # A key of ours was stored before the site brought its own: the private half goes.
    (GIVEN, StoredSiteKey(b"ecdsa-sha2-nistp384 AAAAours", True, CA), "use-given"),
    (GIVEN, StoredSiteKey(GIVEN.encode(), True, CA), "use-given"),
    ("ecdsa-sha2-nistp384 AAAAnew", StoredSiteKey(GIVEN.encode(), False, CA), "use-given"),
])
def test_a_sites_key_secret_holds_its_own_key_or_ours(
        public_key: str | None, stored: StoredSiteKey | None, action: str) -> None:
    site = Site(name="alice-laptop", external=True, public_key=public_key)
    assert site_key_action(site, stored, CA) == action


def test_node_authentication_off_registers_nothing(fed_spec: FederationSpec) -> None:
    spec = fed_spec.model_copy(update={"server": fed_spec.server.model_copy(
        update={"node_authentication": False})})
    assert sites_to_register(spec, observed()) == []


def test_status_is_ready_when_serving_and_all_sites_registered(fed_spec: FederationSpec) -> None:
    registered = {s: str(i) for i, s in enumerate(KEYS)}
    status = federation_status("clinical-notes", "research", fed_spec, observed(), registered,
                               "clinical-notes-server.research.svc:9092", "fl.pollinate.localhost:443")
    assert status.phase == "Ready"
    assert status.endpoint == "fl.pollinate.localhost:443"
    assert status.sites_summary == "4/4"
    assert {c.type: c.status for c in status.conditions} == {
        "Ready": "True", "Progressing": "False", "Degraded": "False"}
    assert status.sites[0].key_secret == "clinical-notes-site-hospital-a"


def test_ready_on_the_last_word_of_a_server_that_did_not_answer_says_so(fed_spec: FederationSpec) -> None:
    registered = {s: str(i) for i, s in enumerate(KEYS)}
    status = federation_status("f", "ns", fed_spec, observed(flower_nodes=None), registered, "in", None)
    assert status.phase == "Ready"
    progressing = next(c for c in status.conditions if c.type == "Progressing")
    assert progressing.status == "True" and progressing.reason == "ServerUnreachable"
    assert not settled(status.to_wire())


def test_a_certificate_the_operator_cannot_verify_is_reported_as_such_not_as_unreachable(
        fed_spec: FederationSpec) -> None:
    registered = {s: str(i) for i, s in enumerate(KEYS)}
    problem = "Flower server f-server.ns.svc:9092: the server's certificate has expired (...)"
    was_ready = observed(flower_nodes=None, previous=FederationStatus(phase="Ready"))
    status = federation_status("f", "ns", fed_spec, was_ready, registered, "in", None,
                               certificate_problem=problem)
    assert status.phase == "Degraded"
    conditions = {c.type: c for c in status.conditions}
    assert conditions["Ready"].status == "False" and conditions["Ready"].reason == "CertificateInvalid"
    assert conditions["Ready"].message == problem and conditions["Degraded"].status == "True"
    assert not settled(status.to_wire())
    fresh = federation_status("f", "ns", fed_spec, observed(flower_nodes=None), registered, "in", None,
                              certificate_problem=problem)
    assert fresh.phase == "Pending"


def test_status_is_pending_while_registering(fed_spec: FederationSpec) -> None:
    status = federation_status("f", "ns", fed_spec, observed(), {"hospital-a": "1"}, "in", None)
    assert status.phase == "Pending"
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert ready.reason == "RegisteringSites" and "1/4 site keys registered" in ready.message


def test_a_ready_federation_whose_server_goes_away_is_degraded(fed_spec: FederationSpec) -> None:
    obs = observed(server_ready_replicas=0, previous=FederationStatus(phase="Ready"))
    status = federation_status("f", "ns", fed_spec, obs, {}, "in", None)
    assert status.phase == "Degraded"
    degraded = next(c for c in status.conditions if c.type == "Degraded")
    assert degraded.status == "True" and degraded.reason == "ServerUnavailable"


def test_latest_adapter_is_the_newest_version_published_in_s3(fed_spec: FederationSpec) -> None:
    obs = observed(published_adapter_versions=(1, 3, 2),
                   previous=FederationStatus(latest_adapter_version="v1"))
    status = federation_status("f", "ns", fed_spec, obs, {}, "in", None)
    assert status.latest_adapter_version == "v3"


def test_latest_adapter_is_kept_while_s3_cannot_be_read(fed_spec: FederationSpec) -> None:
    obs = observed(published_adapter_versions=None, previous=FederationStatus(latest_adapter_version="v2"))
    assert federation_status("f", "ns", fed_spec, obs, {}, "in", None).latest_adapter_version == "v2"


def test_no_published_adapter_leaves_the_column_empty(fed_spec: FederationSpec) -> None:
    obs = observed(published_adapter_versions=())
    assert federation_status("f", "ns", fed_spec, obs, {}, "in", None).latest_adapter_version is None


def test_a_new_federation_without_its_deployment_is_starting(fed_spec: FederationSpec) -> None:
    status = federation_status("f", "ns", fed_spec, observed(server_ready_replicas=None), {}, "in", None)
    assert status.phase == "Pending"
    conds = {c.type: c for c in status.conditions}
    assert conds["Ready"].status == "False" and conds["Ready"].reason == "ServerStarting"
    assert conds["Ready"].message == "Deployment f-server is being created"
    assert conds["Progressing"].status == "True"
    assert conds["Degraded"].status == "False"


def test_a_starting_server_with_no_ready_replica_says_so(fed_spec: FederationSpec) -> None:
    status = federation_status("f", "ns", fed_spec, observed(server_ready_replicas=0), {}, "in", None)
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert ready.reason == "ServerStarting" and ready.message == "Deployment f-server has no ready replica"
    assert status.phase == "Pending"


def test_a_degraded_federation_whose_server_returns_is_ready_again(fed_spec: FederationSpec) -> None:
    registered = {s: str(i) for i, s in enumerate(KEYS)}
    ready = federation_status("f", "ns", fed_spec, observed(), registered, "in", None, now="t0")
    degraded = federation_status("f", "ns", fed_spec, observed(
        server_ready_replicas=0, previous=ready), registered, "in", None, now="t1")
    assert degraded.phase == "Degraded"
    back = federation_status("f", "ns", fed_spec, observed(previous=degraded), registered, "in", None,
                             now="t2")
    assert back.phase == "Ready"
    conds = {c.type: c for c in back.conditions}
    assert (conds["Ready"].status, conds["Ready"].reason) == ("True", "ServerReady")
    assert (conds["Degraded"].status, conds["Degraded"].reason) == ("False", "AsExpected")
    assert conds["Progressing"].status == "False"
    # Each flip is a transition; the time of each condition says when it last changed.
    assert conds["Ready"].last_transition_time == "t2"
    assert conds["Degraded"].last_transition_time == "t2"


def test_status_records_the_generation_it_describes(fed_spec: FederationSpec) -> None:
    status = federation_status("f", "ns", fed_spec, observed(generation=7), {}, "in", None)
    assert status.observed_generation == 7
    assert {c.observed_generation for c in status.conditions} == {7}
