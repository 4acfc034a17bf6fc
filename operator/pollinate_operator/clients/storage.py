"""A Federation's S3 store, as the operator reads it: run progress and adapter versions."""

from __future__ import annotations

import functools
import logging
from typing import Any

import botocore.exceptions
from pollinate_runtime.store import FederationStore, ObjectStore, RetryPolicy, StoreError, s3_client
from pydantic import ValidationError

from ..api.federation import FederationSpec
from ..api.traininground import RoundMetrics
from ..reconcile.traininground import Progress
from . import kube

log = logging.getLogger(__name__)
# The operator polls: a failed read is retried on the next pass, not inside this one.
_NO_RETRY = RetryPolicy(deadline_seconds=0.0)


@functools.lru_cache(maxsize=256)
def _client(endpoint: str | None, region: str | None, access_key: str, secret_key: str) -> Any:
    """One boto3 client per endpoint and credentials, shared by every pass (boto3 clients are
    thread-safe). Building one parses botocore's service model: at 300 objects and a 10 s
    resync that alone took a sixth of the operator's CPU, and its garbage its memory peak.
    Rotated credentials are a new key, hence a new client."""
    return s3_client(endpoint, region=region, access_key=access_key, secret_key=secret_key,
                     connect_timeout=2.0, read_timeout=5.0)


def federation_store(fed: FederationSpec, federation: str, namespace: str) -> FederationStore | None:
    s3 = fed.storage.s3
    creds = kube.read_secret(namespace, s3.credentials_secret)
    if creds is None:
        return None
    client = _client(s3.endpoint, s3.region,
                     creds.data.get("AWS_ACCESS_KEY_ID", b"").decode(),
                     creds.data.get("AWS_SECRET_ACCESS_KEY", b"").decode())
    prefix = s3.prefix if s3.prefix is not None else federation
    return FederationStore(ObjectStore(client, s3.bucket, prefix, retry=_NO_RETRY))


def published_adapter_versions(fed: FederationSpec, federation: str,
                               namespace: str) -> tuple[int, ...] | None:
    """The complete adapter versions under the Federation's prefix, or None if S3 cannot be
    read now (the status then keeps what it last saw)."""
    store = federation_store(fed, federation, namespace)
    if store is None:
        return None
    try:
        return tuple(store.adapter_versions())
    # A missing bucket or refused credentials too: the column waits, the Federation's own
    # status (server, keys) must still be written.
    except (StoreError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
        log.info("adapter versions of %s not readable yet: %s", federation, err)
        return None


def read_progress(fed: FederationSpec, federation: str, namespace: str,
                  training_round: str) -> Progress | None:
    store = federation_store(fed, federation, namespace)
    if store is None:
        return None
    try:
        progress = store.read_progress(training_round)
    except StoreError as err:
        log.info("run progress of %s not readable yet: %s", training_round, err)
        return None
    if progress is None:
        return None
    try:
        metrics = tuple(RoundMetrics.from_stored(m) for m in progress.rounds)
    except ValidationError as err:
        log.warning("run progress of %s has round metrics the API cannot hold: %s", training_round, err)
        return None
    version = f"v{progress.adapter_version}" if progress.adapter_version else None
    return Progress(progress.round, metrics, version, progress.last_checkpoint)
