"""kopf wiring for Federation: gather what is observed, let `reconcile` decide, apply it."""

from __future__ import annotations

import datetime as dt
import functools
import logging
from typing import NamedTuple

import kopf

from .. import pki
from ..api.federation import FederationSpec, FederationStatus, ServerCertificateStatus
from ..clients import kube, storage
from ..clients.flower import (
    FlowerCertificateInvalid,
    FlowerControl,
    FlowerRefused,
    FlowerUnavailable,
)
from ..manifests import names, secrets, server
from ..manifests.security import owner_reference
from ..reconcile import admission
from ..reconcile import federation as plan
from ..settings import Settings
from .level_triggered import reconcile_on_every_pass, wake_owners_of


def _owned(obj: dict, body: kopf.Body) -> dict:
    obj["metadata"]["ownerReferences"] = [owner_reference(dict(body))]
    return obj


@functools.lru_cache(maxsize=4096)
def public_pem(openssh: bytes) -> bytes:
    # Pure, and asked for every site on every pass.
    return pki.public_key_pem(openssh)


class ServerTLS(NamedTuple):
    ca_pem: bytes  # the CAs sites and the ingress trust the server by (two during an overlap)
    cert_pem: bytes  # empty if a user's Secret lacks it
    certificate: ServerCertificateStatus | None = None


def flower_address(name: str, namespace: str, settings: Settings) -> str:
    return settings.flower_address_override or server.in_cluster_address(name, namespace, settings)


def control_token(name: str, namespace: str, owner_uid: str) -> str | None:
    stored = kube.read_owned_secret(namespace, names.control_token_secret(name), owner_uid)
    token = stored.data.get(secrets.CONTROL_TOKEN_KEY) if stored else None
    return token.decode() if token else None


def open_control(name: str, namespace: str, spec: FederationSpec, settings: Settings,
                 owner_uid: str) -> FlowerControl | None:
    """The Federation's server's control API with the operator's credential, or None while
    its CA or token is not stored yet (the Federation's reconcile makes them). `owner_uid`:
    the Federation's; a token or CA Secret it does not control is never used (NotOurs)."""
    tls_name = server.tls_secret_name(name, spec)
    tls = (kube.read_secret(namespace, tls_name) if spec.server.tls.secret_name
           else kube.read_owned_secret(namespace, tls_name, owner_uid))
    token = control_token(name, namespace, owner_uid)
    if tls is None or "ca.crt" not in tls.data or token is None:
        return None
    return FlowerControl(flower_address(name, namespace, settings), tls.data["ca.crt"], token)


def list_flower_nodes(control: FlowerControl) -> list[plan.FlowerNode]:
    return [plan.FlowerNode(n.node_id, n.status, n.public_key_pem, n.name) for n in control.nodes()]


def _ensure_control_token(name: str, namespace: str, body: kopf.Body) -> str:
    token = control_token(name, namespace, body.meta["uid"])
    if token is None:
        token = secrets.new_control_token()
        kube.apply(_owned(secrets.control_token_secret(name, namespace, token), body))
    return token


def _stored_ca(secret: kube.SecretData | None, cert_key: str,
               key_key: str) -> pki.CertificateAuthority | None:
    if secret is None or cert_key not in secret.data or key_key not in secret.data:
        return None
    return pki.CertificateAuthority(secret.data[cert_key], secret.data[key_key])


def _rotated_at(ca_secret: kube.SecretData | None) -> dt.datetime | None:
    """When the previous CA was replaced; unreadable (someone edited the Secret): None, so
    its overlap ends now rather than the pass failing for ever."""
    text = ca_secret.annotations.get(names.CA_ROTATED_AT_ANNOTATION) if ca_secret else None
    try:
        return dt.datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


@functools.lru_cache(maxsize=1024)
def _certificate_facts(server_pem: bytes, current_pem: bytes, previous_pem: bytes) -> tuple[
        tuple[frozenset[str], frozenset[str]], dt.datetime, plan.CAIssuer | None]:
    """The server certificate's names, expiry and issuer: pure, and asked on every pass (a
    signature check each), so kept."""
    issuer: plan.CAIssuer | None = None
    if current_pem and pki.issued_by(server_pem, current_pem):
        issuer = "current"
    elif previous_pem and pki.issued_by(server_pem, previous_pem):
        issuer = "previous"
    dns, ips = pki.certificate_names(server_pem)
    return (frozenset(dns), frozenset(ips)), pki.not_after(server_pem), issuer


def _certificate_status(cert_pem: bytes, spec: FederationSpec,
                        previous_until: dt.datetime | None) -> ServerCertificateStatus | None:
    try:
        not_after = pki.not_after(cert_pem)
    except ValueError:  # a user's Secret without a usable tls.crt: the server says why
        return None
    renew = not_after - spec.server.tls.renewal_margin if not spec.server.tls.secret_name else None
    return ServerCertificateStatus(
        not_after=not_after.isoformat(), renew_after=renew.isoformat() if renew else None,
        previous_ca_trusted_until=previous_until.isoformat() if previous_until else None)


def _ensure_tls(name: str, namespace: str, spec: FederationSpec, body: kopf.Body,
                logger: logging.Logger, now: dt.datetime | None = None) -> ServerTLS:
    """Make the CA and server certificate exist, cover the server and stay valid (renewed
    `renewBefore` expiry; after a rotation the old CA keeps signing for `caOverlap`); return
    the CAs to trust and the certificate."""
    now = now or dt.datetime.now(dt.UTC)
    if spec.server.tls.secret_name:
        given = kube.read_secret(namespace, spec.server.tls.secret_name)
        if given is None or "ca.crt" not in given.data:
            raise kopf.TemporaryError(
                f"spec.server.tls.secretName {spec.server.tls.secret_name!r}: Secret missing or "
                "without ca.crt, tls.crt and tls.key", delay=30)
        cert_pem = given.data.get("tls.crt", b"")
        return ServerTLS(given.data["ca.crt"], cert_pem, _certificate_status(cert_pem, spec, None))
    ca_secret = kube.read_owned_secret(namespace, names.ca_secret(name), body.meta["uid"])
    tls_secret = kube.read_owned_secret(namespace, names.server_tls_secret(name), body.meta["uid"])
    current = _stored_ca(ca_secret, "ca.crt", "ca.key")
    previous = _stored_ca(ca_secret, secrets.PREVIOUS_CA_CERT, secrets.PREVIOUS_CA_KEY)
    rotated_at = _rotated_at(ca_secret)
    server_pem = tls_secret.data.get("tls.crt") if tls_secret else None
    names_, not_after, issuer = (_certificate_facts(server_pem, current.cert_pem if current else b"",
                                                     previous.cert_pem if previous else b"")
                                 if server_pem else (None, None, None))
    observed = plan.TLSObserved(
        ca_cert_pem=current.cert_pem if current else None,
        ca_rotation=int(ca_secret.annotations.get(names.ROTATION_ANNOTATION, -1)) if ca_secret else None,
        server_cert_names=names_, previous_ca_cert_pem=previous.cert_pem if previous else None,
        ca_rotated_at=rotated_at, server_not_after=not_after, server_issuer=issuer,
    )
    dns = server.tls_dns_names(name, namespace, spec)
    decision = plan.plan_tls(spec, observed, dns, now)
    rotation = spec.server.tls.rotation
    if decision.new_ca or (previous is not None) != decision.keep_previous_ca:
        if decision.new_ca:
            if current is not None and decision.keep_previous_ca:
                previous, rotated_at = current, now
            current = pki.new_ca(f"pollinate {namespace}/{name} CA")
            logger.info("generated the federation CA (rotation %d)%s", rotation,
                        f"; the previous CA stays trusted until {(now + spec.server.tls.overlap).isoformat()}"
                        if decision.keep_previous_ca else "")
        if not decision.keep_previous_ca:
            if previous is not None and not decision.new_ca:
                logger.info("the previous CA's overlap ended: sites trust only the current CA")
            previous, rotated_at = None, None
        kube.apply(_owned(secrets.ca_secret(name, namespace, current, rotation, previous, rotated_at), body))
    assert current is not None
    trusted = pki.bundle(current.cert_pem, previous.cert_pem if previous else None)
    previous_until = rotated_at + spec.server.tls.overlap if previous and rotated_at else None
    if decision.new_server_certificate:
        signer = previous if previous is not None else current
        cert = pki.new_server_certificate(signer, dns, now=now, validity=spec.server.tls.lifetime)
        kube.apply(_owned(secrets.server_tls_secret(name, namespace, trusted, cert, rotation), body))
        logger.info("issued the server certificate for %s, valid until %s: %s", ", ".join(dns),
                    pki.not_after(cert.cert_pem).isoformat(), decision.why)
        server_pem = cert.cert_pem
    else:
        assert tls_secret is not None and server_pem is not None
        if tls_secret.data.get("ca.crt") != trusted:  # a rotation began or its overlap ended
            kept = pki.ServerCertificate(server_pem, tls_secret.data.get("tls.key", b""))
            kube.apply(_owned(secrets.server_tls_secret(name, namespace, trusted, kept, rotation), body))
    return ServerTLS(trusted, server_pem, _certificate_status(server_pem, spec, previous_until))


def _ensure_site_keys(name: str, namespace: str, spec: FederationSpec, ca_pem: bytes,
                      body: kopf.Body) -> dict[str, bytes]:
    """Every site has a key Secret carrying the current CA (and its own public key, for a site
    that brought one); return site -> public key PEM, removed sites' included (their keys
    are unregistered before their Secrets go)."""
    # Only this Federation's own: a Secret someone else labelled as a site key is no key of it.
    stored = {s.labels[names.SITE_LABEL]: s
              for s in kube.list_secrets(namespace, names.site_secrets_selector(name))
              if "site.pub" in s.data and s.controller_uid == body.meta["uid"]}
    keys = {site: public_pem(s.data["site.pub"]) for site, s in stored.items()}
    for index, site in enumerate(spec.sites):
        found = stored.get(site.name)
        observed = plan.StoredSiteKey(found.data["site.pub"], "site.key" in found.data,
                                      found.data.get("ca.crt")) if found else None
        action = plan.site_key_action(site, observed, ca_pem)
        if action == "keep":
            continue
        if action == "use-given":
            given = (site.public_key or "").strip().encode()
            try:
                keys[site.name] = public_pem(given)
            except ValueError as err:
                raise kopf.TemporaryError(
                    f"spec.sites[{index}].publicKey (site {site.name}): not an OpenSSH "
                    f"ecdsa-sha2-nistp384 public key ({err})", delay=60) from err
            kube.apply(_owned(secrets.site_secret(name, namespace, site.name, given, ca_pem), body))
            continue
        key = (pki.SiteKey(found.data["site.key"], found.data["site.pub"])
               if action == "refresh-ca" and found else pki.new_site_key())
        kube.apply(_owned(secrets.site_secret(name, namespace, site.name, key, ca_pem), body))
        keys[site.name] = public_pem(key.public_openssh)
    return keys


def reconcile(name: str, namespace: str, body: kopf.Body, settings: Settings,
              logger: logging.Logger) -> FederationStatus:
    previous = FederationStatus.from_stored(dict(body.get("status") or {}))

    def blocked(reason: str, message: str) -> FederationStatus:
        # Nothing more is applied; the Federation says why, with one Event per new reason.
        if not any(c.reason == reason and c.message == message for c in previous.conditions):
            kopf.event(body, type="Warning", reason=reason, message=message)
        logger.warning("%s", message)
        return plan.blocked_status(previous, reason, message, body.meta.get("generation", 0))

    spec = FederationSpec.model_validate(dict(body["spec"]))
    refused = admission.refusals(spec, settings.admission)
    if refused:
        return blocked("PolicyViolation", "; ".join(refused))
    try:
        return _reconcile(name, namespace, spec, body, settings, logger, previous)
    except kube.NotOurs as clash:
        return blocked("NameConflict", str(clash))


def _reconcile(name: str, namespace: str, spec: FederationSpec, body: kopf.Body, settings: Settings,
               logger: logging.Logger, previous: FederationStatus) -> FederationStatus:
    tls = _ensure_tls(name, namespace, spec, body, logger)
    ca_pem = tls.ca_pem
    token = _ensure_control_token(name, namespace, body)
    # The server first: its pod starts (image pull, SuperLink start) while the site keys are
    # made, which it does not need.
    cert_fingerprint = pki.fingerprint(tls.cert_pem) if tls.cert_pem else ""
    for obj in server.server_objects(name, namespace, spec, settings, cert_fingerprint):
        kube.apply_if_changed(_owned(obj, body))
    site_keys = _ensure_site_keys(name, namespace, spec, ca_pem, body)

    ready = kube.deployment_ready_replicas(namespace, names.server(name))
    flower_nodes = None
    certificate_problem = None
    if ready or settings.flower_address_override:
        try:
            with FlowerControl(flower_address(name, namespace, settings), ca_pem, token) as control:
                flower_nodes = list_flower_nodes(control)
                observed = plan.FederationObserved(
                    body.meta.get("generation", 0), plan.TLSObserved(), site_keys, ready,
                    flower_nodes, previous)
                for node_id, node_name in plan.nodes_to_unregister(spec, observed).items():
                    control.unregister_site(node_id)
                    logger.info("unregistered node %s (registered as %r): its key is no current "
                                "site key of this Federation", node_id, node_name)
                for site in plan.sites_to_register(spec, observed):
                    node_id = control.register_site(site, site_keys[site])
                    logger.info("registered site %s as node %s", site, node_id)
                flower_nodes = list_flower_nodes(control)
        except FlowerCertificateInvalid as err:
            logger.warning("%s", err)
            certificate_problem, flower_nodes = str(err), None
        except FlowerUnavailable as err:
            logger.info("Flower server not reachable yet: %s", err)
            flower_nodes = None
        except FlowerRefused as err:
            # A server started before its token Secret was mounted, or one that is not ours.
            logger.warning("%s", err)
            flower_nodes = None

    observed = plan.FederationObserved(
        generation=body.meta.get("generation", 0), tls=plan.TLSObserved(), site_keys=site_keys,
        server_ready_replicas=ready, flower_nodes=flower_nodes, previous=previous,
        published_adapter_versions=storage.published_adapter_versions(spec, name, namespace),
    )
    registered = plan.registered_sites(observed)
    # With authentication on, a removed site's key is deleted only once the server has
    # forgotten it: a key that is still registered must stay revocable.
    if flower_nodes is not None or not spec.server.node_authentication:
        for site in plan.stale_sites(spec, observed):
            if site not in registered:  # unregistered first, so a crash here loses nothing
                kube.delete("v1", "Secret", namespace, names.site_secret(name, site))
    return plan.federation_status(
        name, namespace, spec, observed, registered,
        internal_endpoint=server.in_cluster_address(name, namespace, settings),
        external_endpoint=server.external_endpoint(spec), certificate=tls.certificate,
        certificate_problem=certificate_problem,
    )


def register(settings: Settings) -> None:
    reconcile_on_every_pass("federations", "federation", reconcile, settings, settled=plan.settled)
    # Every kind applied through kube.apply_if_changed is watched: a change forgets what was
    # applied, and wakes the Federation to apply it again.
    wake_owners_of("apps", "v1", "deployments")
    wake_owners_of("", "v1", "services")
    wake_owners_of("networking.k8s.io", "v1", "ingresses")
    wake_owners_of("networking.k8s.io", "v1", "networkpolicies")
    # A site's key Secret deleted (how a key is rotated) or changed: a new key and the old one
    # unregistered at once, not at the settled resync a minute later.
    wake_owners_of("", "v1", "secrets")
