"""The Flower server's Control API, through flwr's own HTTP client (no hand-written protocol).

The operator starts, polls and stops runs here, and registers and unregisters site keys.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import httpx
from flwr.common.serde import fab_to_proto, run_from_proto, user_config_to_proto
from flwr.proto.control_pb2 import (  # pylint: disable=no-name-in-module
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
    UnregisterNodeRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.fab import Fab
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
from flwr.supercore.interceptors.http.utils import add_headers
from flwr.supercore.protobuf.client import ProtobufCall, ProtobufRequestContext
from pollinate_runtime.app_bundle import app_bundle, app_bundle_hash
from pollinate_runtime.run_config import RunConfig


class FlowerUnavailable(ConnectionError):
    """The server cannot be reached (yet): a reason to retry, not to fail."""


class FlowerCertificateInvalid(FlowerUnavailable):
    """The server presented a certificate the Federation's CAs do not accept: expired, for
    another name, or another CA's. Asking again will not help until the certificate changes."""


class FlowerRefused(PermissionError):
    """The server's gate refused the operator's credential (pollinate_runtime.server_gate)."""


class ControlTokenInterceptor:
    """Presents the operator's control token on every control call."""

    def __init__(self, token: str) -> None:
        self._headers = {"authorization": f"Bearer {token}"}

    def intercept(self, context: ProtobufRequestContext, call_next: ProtobufCall) -> httpx.Response:
        add_headers(context.request, self._headers)
        return call_next(context)


@dataclass(frozen=True)
class RunState:
    run_id: int
    status: str  # pending | starting | running | finished
    sub_status: str  # completed | failed | stopped (when finished)
    details: str

    @property
    def finished(self) -> bool:
        return self.status == "finished"


@dataclass(frozen=True)
class RunSummary:
    run_id: int
    status: str
    override_config: dict


@dataclass(frozen=True)
class RegisteredNode:
    node_id: str  # a uint64: kept as text, as in status
    status: str  # registered | online | offline | unregistered
    name: str
    public_key_pem: bytes


def pollinate_fab() -> Fab:
    """Pollinate's app bundle, the same for every run: sites refuse any other."""
    return Fab(app_bundle_hash(), app_bundle(), {})


class FlowerControl:
    def __init__(self, address: str, ca_cert_pem: bytes, control_token: str) -> None:
        self.address = address
        self._client = ControlHttpClient.from_server_address(
            address, insecure=False, root_certificates=ca_cert_pem,
            interceptors=[ControlTokenInterceptor(control_token),
                          RuntimeVersionHttpInterceptor("pollinate-operator")],
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FlowerControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request):
        try:
            return getattr(self._client, method)(request)
        except Exception as err:  # flwr raises transport errors of several kinds
            if problem := certificate_problem(err, self.address):
                raise FlowerCertificateInvalid(f"Flower server {self.address}: {problem}") from err
            if _is_unavailable(err):
                raise FlowerUnavailable(f"Flower server {self.address}: {err}") from err
            if _status(err) in (401, 403):
                raise FlowerRefused(f"Flower server {self.address} refused the operator's "
                                    f"control token: {_body(err)}") from err
            raise

    def start_run(self, config: RunConfig) -> int:
        request = StartRunRequest(
            fab=fab_to_proto(pollinate_fab()),
            override_config=user_config_to_proto(config.to_flower()),
            federation="",
        )
        return int(self._call("StartRun", request).run_id)

    def get_run(self, run_id: int) -> RunState | None:
        """The run, or None when the server does not have it (a restarted server whose state
        was lost answers 404 for it)."""
        try:
            response = self._call("ListRuns", ListRunsRequest(run_id=run_id))
        except Exception as err:
            if "404" in str(err):
                return None
            raise
        proto = response.run_dict.get(run_id)
        if proto is None:
            return None
        run = run_from_proto(proto)
        return RunState(run.run_id, run.status.status, run.status.sub_status, run.status.details)

    def list_runs(self) -> list[RunSummary]:
        response = self._call("ListRuns", ListRunsRequest())
        runs = (run_from_proto(p) for p in response.run_dict.values())
        return [RunSummary(r.run_id, r.status.status, dict(r.override_config)) for r in runs]

    def stop_run(self, run_id: int) -> None:
        try:
            self._call("StopRun", StopRunRequest(run_id=run_id))
        except Exception as err:
            # The server refuses to stop a run that is finished or already stopping.
            if "412" not in str(err):
                raise

    def register_site(self, name: str, public_key_pem: bytes) -> str:
        request = RegisterNodeRequest(public_key=public_key_pem, name=name)
        return str(self._call("RegisterNode", request).node_id)

    def unregister_site(self, node_id: str) -> None:
        self._call("UnregisterNode", UnregisterNodeRequest(node_id=int(node_id)))

    def nodes(self) -> list[RegisteredNode]:
        response = self._call("ListNodes", ListNodesRequest())
        return [RegisteredNode(str(n.node_id), n.status, n.name, bytes(n.public_key))
                for n in response.nodes_info]


def _status(err: Exception) -> int | None:
    status = getattr(getattr(err, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _body(err: Exception) -> str:
    response = getattr(err, "response", None)
    try:
        return str(response.text).strip() if response is not None else str(err)
    except Exception:  # a streamed body already closed
        return str(err)


def certificate_problem(err: BaseException, address: str) -> str | None:
    """What was wrong with the server's certificate, if a TLS verification failure is
    anywhere in `err`'s chain (httpx wraps it as a connection error)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            detail = current.verify_message or str(current)
            if "expired" in detail:
                return f"the server's certificate has expired ({detail})"
            if "mismatch" in detail:
                return f"the server's certificate is not valid for {address} ({detail})"
            return f"the server's certificate is not signed by the Federation's CA ({detail})"
        current = current.__cause__ or current.__context__
    return None


def _is_unavailable(err: Exception) -> bool:
    """Whether the server could not answer now: no connection, or a 5xx (Flower's SuperLink
    answers 500 when its SQLite state is locked by a burst of sites). The next pass asks again;
    a 4xx is an answer and is left to the caller."""
    status = _status(err)
    if status is not None and status >= 500:
        return True
    text = f"{type(err).__name__} {err}".lower()
    return any(s in text for s in ("connect", "unavailable", "timeout", "timed out", "refused",
                                   "name or service not known", "temporary failure"))
