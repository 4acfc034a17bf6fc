"""What a Federation needs next, decided from what is observed. No I/O here.

The handler gathers a `FederationObserved`, asks these functions what to write, writes it,
and stores the status they compute. Everything is recomputed on every pass, so a deleted
child or a lost registration is repaired by the next pass (level-triggered).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..api.conditions import Condition, set_condition
from ..api.federation import (
    FederationSpec,
    FederationStatus,
    ServerCertificateStatus,
    Site,
    SiteIdentity,
)
from ..manifests import names

CAIssuer = Literal["current", "previous"]


@dataclass(frozen=True)
class TLSObserved:
    ca_cert_pem: bytes | None = None
    ca_rotation: int | None = None
    server_cert_names: tuple[frozenset[str], frozenset[str]] | None = None  # DNS, IPs
    # The CA a rotation replaced, still trusted (and signing) until its overlap ends.
    previous_ca_cert_pem: bytes | None = None
    ca_rotated_at: dt.datetime | None = None
    server_not_after: dt.datetime | None = None
    # Which of the two CAs signed the server certificate (None: neither, or no certificate).
    server_issuer: CAIssuer | None = None


@dataclass(frozen=True)
class FlowerNode:
    node_id: str
    status: str
    public_key_pem: bytes
    name: str = ""  # the name it was registered under: for people, never for matching


@dataclass(frozen=True)
class StoredSiteKey:
    """A site's key Secret as stored: its public key (OpenSSH), whether the private half is
    kept there, and the CA certificate it carries."""

    public_openssh: bytes
    has_private_key: bool
    ca_cert_pem: bytes | None


@dataclass(frozen=True)
class FederationObserved:
    generation: int
    tls: TLSObserved
    # Site name -> PEM public key, from the site Secrets that exist.
    site_keys: dict[str, bytes]
    # None: the Deployment does not exist; otherwise its ready replicas.
    server_ready_replicas: int | None
    # None when the server could not be asked.
    flower_nodes: list[FlowerNode] | None
    previous: FederationStatus = field(default_factory=FederationStatus)
    # The complete adapter versions in the Federation's S3 store (S3 holds the training
    # state); None when it could not be read.
    published_adapter_versions: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TLSPlan:
    new_ca: bool
    new_server_certificate: bool
    # After this pass: the CA a rotation replaced stays in the bundle sites trust, and signs
    # the server certificate, so a site that has only the old CA is not cut off.
    keep_previous_ca: bool = False
    why: str = ""  # what made a new certificate due, for the log and the Event


def plan_tls(spec: FederationSpec, observed: TLSObserved, dns_names: list[str],
             now: dt.datetime | None = None) -> TLSPlan:
    """Generate what is missing; renew the server certificate `renewBefore` its expiry or when
    its names no longer cover the server (a new ingress host); on a rotation, make a new CA but
    keep the old one trusted and signing for `caOverlap`, then move the server to the new one.
    A `caOverlap` of 0s cuts over at once (a compromised CA)."""
    tls = spec.server.tls
    if tls.secret_name:
        return TLSPlan(False, False)  # the user owns the material
    now = now or dt.datetime.now(dt.UTC)
    if observed.ca_cert_pem is None:
        return TLSPlan(True, True, why="no CA yet")
    rotate = observed.ca_rotation != tls.rotation
    if rotate:
        keep_previous = tls.overlap > dt.timedelta(0)
    else:
        keep_previous = (observed.previous_ca_cert_pem is not None and observed.ca_rotated_at is not None
                         and now < observed.ca_rotated_at + tls.overlap)
    # Who must have signed the server certificate after this pass, as observed before it: on a
    # rotation with overlap the CA being replaced is still today's "current".
    if rotate:
        signer: CAIssuer | None = "current" if keep_previous else None  # None: the new CA
    else:
        signer = "previous" if keep_previous else "current"
    names_ok = observed.server_cert_names is not None and (
        set(dns_names) <= observed.server_cert_names[0] and "127.0.0.1" in observed.server_cert_names[1]
    )
    if observed.server_not_after is None or observed.server_cert_names is None:
        why = "no server certificate yet"
    elif signer is None or observed.server_issuer != signer:
        why = "the server moves to the new CA" if not keep_previous else "not signed by the CA in use"
    elif not names_ok:
        why = f"its names do not cover {', '.join(dns_names)} and 127.0.0.1"
    elif now >= observed.server_not_after - tls.renewal_margin:
        why = f"it expires at {observed.server_not_after.isoformat()}"
    else:
        why = ""
    return TLSPlan(rotate, bool(why), keep_previous, why)


KeyAction = Literal["keep", "generate", "refresh-ca", "use-given"]


def site_key_action(site: Site, stored: StoredSiteKey | None, ca_cert_pem: bytes) -> KeyAction:
    """What the site's key Secret needs. A site that brings its own public key
    (`sites[].publicKey`) has only that in its Secret, never a private key of ours; any other
    site gets a key the operator makes, kept until its Secret is deleted (a rotation)."""
    if site.public_key:
        given = site.public_key.strip().encode()
        if stored is None or stored.has_private_key or stored.public_openssh.strip() != given \
                or stored.ca_cert_pem != ca_cert_pem:
            return "use-given"
        return "keep"
    if stored is None or not stored.has_private_key:
        return "generate"  # new, rotated (Secret deleted), or a publicKey just removed
    return "refresh-ca" if stored.ca_cert_pem != ca_cert_pem else "keep"


def sites_by_key(site_keys: Mapping[str, bytes], nodes: list[FlowerNode]) -> dict[str, str]:
    """Site -> node id of every site whose current key the server holds, matched by the key
    itself: never by the name a node was registered under, which anyone registering a key
    could choose."""
    by_key = {n.public_key_pem: n.node_id for n in nodes if n.status != "unregistered"}
    return {site: by_key[pem] for site, pem in site_keys.items() if pem in by_key}


def sites_needing_keys(spec: FederationSpec, observed: FederationObserved) -> list[str]:
    return [s.name for s in spec.sites if s.name not in observed.site_keys]


def stale_sites(spec: FederationSpec, observed: FederationObserved) -> list[str]:
    """Sites with a key Secret that are no longer in the spec."""
    wanted = {s.name for s in spec.sites}
    return sorted(s for s in observed.site_keys if s not in wanted)


def registered_sites(observed: FederationObserved) -> dict[str, str]:
    """Site -> node id of every site whose key the server holds (by the key itself, so a
    registration whose status write was lost is still found)."""
    if observed.flower_nodes is None:
        # Cannot ask now: keep what the last pass recorded.
        return {s.name: s.node_id for s in observed.previous.sites if s.registered and s.node_id}
    return sites_by_key(observed.site_keys, observed.flower_nodes)


def sites_to_register(spec: FederationSpec, observed: FederationObserved) -> list[str]:
    if not spec.server.node_authentication or observed.flower_nodes is None:
        return []
    registered = registered_sites(observed)
    return [s.name for s in spec.sites if s.name not in registered and s.name in observed.site_keys]


def nodes_to_unregister(spec: FederationSpec, observed: FederationObserved) -> dict[str, str]:
    """Node id -> the name it was registered under, for every registration on the server whose
    key is not the current key of a site in the spec: a site that left, a key rotated away (its
    Secret deleted, its publicKey changed), a key the operator never registered. The operator
    is the only one who registers keys, so the server holds exactly the Federation's keys."""
    if observed.flower_nodes is None or not spec.server.node_authentication:
        return {}
    wanted = {observed.site_keys[s.name] for s in spec.sites if s.name in observed.site_keys}
    return {n.node_id: n.name for n in observed.flower_nodes
            if n.status != "unregistered" and n.public_key_pem not in wanted}


def latest_adapter_version(observed: FederationObserved) -> str | None:
    """The newest published version, as `v<n>`; what the last pass saw if S3 is unreadable."""
    if observed.published_adapter_versions is None:
        return observed.previous.latest_adapter_version
    versions = observed.published_adapter_versions
    return f"v{max(versions)}" if versions else None


def settled(status: Mapping[str, Any]) -> bool:
    """Ready, with nothing left to confirm: only the settled resync looks at it again."""
    progressing = any(c.get("type") == "Progressing" and c.get("status") == "True"
                      for c in status.get("conditions") or [])
    return status.get("phase") == "Ready" and not progressing


def federation_status(
    name: str, namespace: str, spec: FederationSpec, observed: FederationObserved,
    registered: dict[str, str], internal_endpoint: str, external_endpoint: str | None,
    now: str | None = None, certificate: ServerCertificateStatus | None = None,
    certificate_problem: str | None = None,
) -> FederationStatus:
    """`certificate_problem`: what the operator found wrong with the certificate the server
    presented (expired, another name's, another CA's), which no site can get past either."""
    gen = observed.generation
    auth = spec.server.node_authentication
    sites = [
        SiteIdentity(
            name=s.name, external=s.external, key_secret=names.site_secret(name, s.name),
            node_id=registered.get(s.name), registered=s.name in registered if auth else None,
        )
        for s in spec.sites
    ]
    n_registered = sum(1 for s in spec.sites if s.name in registered)
    server_up = bool(observed.server_ready_replicas)
    all_registered = not auth or n_registered == len(spec.sites)
    conditions: list[Condition] = list(observed.previous.conditions)
    if server_up and certificate_problem:
        was_ready = observed.previous.phase in ("Ready", "Degraded")
        phase = "Degraded" if was_ready else "Pending"
        conditions = set_condition(conditions, "Ready", False, "CertificateInvalid",
                                   certificate_problem, gen, now)
        conditions = set_condition(conditions, "Progressing", False, "CertificateInvalid",
                                   certificate_problem, gen, now)
        conditions = set_condition(conditions, "Degraded", was_ready, "CertificateInvalid",
                                   certificate_problem if was_ready else "", gen, now)
    elif server_up and all_registered:
        phase = "Ready"
        conditions = set_condition(conditions, "Ready", True, "ServerReady",
                                   "the server is serving and every site can join", gen, now)
        if auth and observed.flower_nodes is None:
            # A restarted server forgets the keys; until it answers, the last pass's word is all
            # there is, and the Federation is checked again soon (not settled).
            conditions = set_condition(
                conditions, "Progressing", True, "ServerUnreachable",
                "the server did not answer which site keys it holds; showing what it last said",
                gen, now)
        else:
            conditions = set_condition(conditions, "Progressing", False, "Reconciled", "", gen, now)
        conditions = set_condition(conditions, "Degraded", False, "AsExpected", "", gen, now)
    else:
        was_ready = observed.previous.phase == "Ready"
        if not server_up:
            reason = "ServerUnavailable" if was_ready else "ServerStarting"
            message = (f"Deployment {names.server(name)} has no ready replica"
                       if observed.server_ready_replicas is not None
                       else f"Deployment {names.server(name)} is being created")
        else:
            reason, message = "RegisteringSites", (
                f"{n_registered}/{len(spec.sites)} site keys registered with the server")
        phase = "Degraded" if was_ready and not server_up else "Pending"
        conditions = set_condition(conditions, "Ready", False, reason, message, gen, now)
        conditions = set_condition(conditions, "Progressing", not was_ready, reason, message, gen, now)
        conditions = set_condition(conditions, "Degraded", phase == "Degraded", reason,
                                   message if phase == "Degraded" else "", gen, now)
    return FederationStatus(
        phase=phase,
        endpoint=external_endpoint or internal_endpoint,
        internal_endpoint=internal_endpoint,
        ca_secret=names.server_tls_secret(name) if not spec.server.tls.secret_name
        else spec.server.tls.secret_name,
        sites_summary=f"{n_registered if auth else len(spec.sites)}/{len(spec.sites)}",
        latest_adapter_version=latest_adapter_version(observed),
        server_certificate=certificate,
        observed_generation=gen,
        sites=sites,
        conditions=conditions,
    )


def blocked_status(previous: FederationStatus, reason: str, message: str, generation: int,
                   now: str | None = None) -> FederationStatus:
    """The status of a Federation the operator will not reconcile as it is (`reason`: a child's
    name is taken by an object it does not control, NameConflict; the spec breaks the
    cluster's admission policy, PolicyViolation): not Ready (or Degraded, if it was), saying
    why; nothing more is applied."""
    phase = "Degraded" if previous.phase in ("Ready", "Degraded") else "Pending"
    conditions = set_condition(list(previous.conditions), "Ready", False, reason, message,
                               generation, now)
    conditions = set_condition(conditions, "Degraded", phase == "Degraded", reason,
                               message if phase == "Degraded" else "", generation, now)
    return previous.model_copy(update={"phase": phase, "conditions": conditions,
                                       "observed_generation": generation})
