"""Typed view of `crds/federation.yaml` (spec and status)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import Field

from .base import ApiModel, parse_duration
from .conditions import Condition

GROUP = "pollinate.dev"
VERSION = "v1alpha1"
PLURAL = "federations"
KIND = "Federation"


class BaseModelRef(ApiModel):
    name: str | None = None
    uri: str | None = None
    revision: str = "main"

    @property
    def reference(self) -> str:
        """The model as the client runtime takes it: a Hugging Face id or a URI/path."""
        return self.name or self.uri or ""


class AdapterConfig(ApiModel):
    rank: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class S3Storage(ApiModel):
    bucket: str
    prefix: str | None = None
    endpoint: str | None = None
    region: str = "us-east-1"
    credentials_secret: str


class Storage(ApiModel):
    s3: S3Storage


class Ingress(ApiModel):
    host: str
    class_name: str | None = None
    tls_secret: str | None = None
    annotations: dict[str, str] | None = None


class ServerTLS(ApiModel):
    secret_name: str | None = None
    rotation: int = 0
    certificate_duration: str = "8760h"
    renew_before: str = "720h"
    ca_overlap: str = "168h"

    @property
    def lifetime(self) -> dt.timedelta:
        return parse_duration(self.certificate_duration, "spec.server.tls.certificateDuration")

    @property
    def renewal_margin(self) -> dt.timedelta:
        return parse_duration(self.renew_before, "spec.server.tls.renewBefore")

    @property
    def overlap(self) -> dt.timedelta:
        return parse_duration(self.ca_overlap, "spec.server.tls.caOverlap")


class Server(ApiModel):
    image: str = "ghcr.io/pollinate-dev/server:0.1.0"
    resources: dict[str, Any] | None = None
    node_authentication: bool = True
    ingress: Ingress | None = None
    tls: ServerTLS = Field(default_factory=ServerTLS)


class PersistentVolumeClaimSource(ApiModel):
    claim_name: str


class HostPathSource(ApiModel):
    path: str


class ConfigMapSource(ApiModel):
    name: str


class SiteData(ApiModel):
    persistent_volume_claim: PersistentVolumeClaimSource | None = None
    host_path: HostPathSource | None = None
    config_map: ConfigMapSource | None = None
    path: str | None = None


class GeneralEvaluation(ApiModel):
    persistent_volume_claim: PersistentVolumeClaimSource | None = None
    config_map: ConfigMapSource | None = None
    path: str | None = None


class ResourceRequirements(ApiModel):
    limits: dict[str, int | str] | None = None
    requests: dict[str, int | str] | None = None


class Site(ApiModel):
    name: str
    external: bool = False
    # An external site's own public key (OpenSSH ecdsa-sha2-nistp384): its private key then
    # never leaves it, and the operator keeps none.
    public_key: str | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, Any]] | None = None
    resources: ResourceRequirements | None = None
    quantization: Literal["none", "nf4"] = "none"
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    rank: int | None = None
    data: SiteData | None = None


class FederationSpec(ApiModel):
    base_model: BaseModelRef
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    storage: Storage
    server: Server = Field(default_factory=Server)
    client_image: str = "ghcr.io/pollinate-dev/client:0.1.0"
    general_evaluation: GeneralEvaluation | None = None
    sites: list[Site]

    def site(self, name: str) -> Site | None:
        return next((s for s in self.sites if s.name == name), None)


class SiteIdentity(ApiModel):
    name: str
    external: bool | None = None
    key_secret: str | None = None
    node_id: str | None = None
    registered: bool | None = None


class ServerCertificateStatus(ApiModel):
    not_after: str | None = None
    renew_after: str | None = None
    previous_ca_trusted_until: str | None = None


class FederationStatus(ApiModel):
    phase: Literal["Pending", "Ready", "Degraded"] | None = None
    endpoint: str | None = None
    internal_endpoint: str | None = None
    ca_secret: str | None = None
    sites_summary: str | None = None
    latest_adapter_version: str | None = None
    server_certificate: ServerCertificateStatus | None = None
    observed_generation: int | None = None
    sites: list[SiteIdentity] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
