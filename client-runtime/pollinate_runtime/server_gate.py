"""Who may call which of the Flower server's APIs: an ASGI gate in front of Flower's app.

Flower 1.41 serves three APIs on one port and checks little itself
(`../shared/research/flower-1.41-trust.md`): the control API (start and stop runs, register
and unregister site keys) answers anyone, and the runtime API (where the ServerApp takes its
task and reads every site's update) needs no credential for its first call. Here:

| API                          | who may call it                                         |
| ---------------------------- | ------------------------------------------------------- |
| `GET /health`                | anyone who reaches the port (kubelet probes)            |
| `/v1/fleet/*`                | anyone; Flower then checks the site's registered key    |
| `/v1/control/*`              | only a caller presenting the operator's control token   |
| `/v1/runtime/*`, all else    | only the server's own processes (a loopback peer)       |

A path that is not in canonical form (percent-encoded, `.` or `..` segments, doubled or
trailing slashes, upper case) is refused before it is classified, so no spelling of a path
reaches a route the canonical one would not. The token is read from its file on every control
call: a rotated Secret takes effect without a restart. Control calls are few (the operator's
reconciles), so the read costs nothing that matters.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from .server_metrics import REFUSED_REQUESTS

log = logging.getLogger("pollinate.server_gate")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

CONTROL_TOKEN_FILE_ENV = "POLLINATE_CONTROL_TOKEN_FILE"
# Segments of lower-case letters, digits, dots, dashes and underscores; no empty segment.
_CANONICAL = re.compile(r"^(/[a-z0-9._-]+)+$")


class Api(Enum):
    HEALTH = "health"
    FLEET = "fleet"
    CONTROL = "control"
    RUNTIME = "runtime"
    OTHER = "other"


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str  # a metric label: short, fixed
    message: str  # what the refused party is told


def canonical(raw_path: str) -> bool:
    if not _CANONICAL.match(raw_path):
        return False
    return not any(segment in (".", "..") for segment in raw_path.split("/"))


def classify(path: str) -> Api:
    """The API a canonical path belongs to."""
    if path == "/health":
        return Api.HEALTH
    for api in (Api.FLEET, Api.CONTROL, Api.RUNTIME):
        if path.startswith(f"/v1/{api.value}/"):
            return api
    return Api.OTHER


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def decide(raw_path: str, peer_host: str | None, presented_token: str | None,
           control_token: str | None) -> tuple[Api, Refusal | None]:
    """Whether a request may reach Flower: its API, and the refusal if it may not."""
    if not canonical(raw_path):
        return Api.OTHER, Refusal(
            400, "non-canonical-path",
            "the server takes paths only in canonical form: lower-case segments, no "
            "percent-encoding, no '.' or '..' segments, no doubled or trailing slash")
    api = classify(raw_path)
    if api in (Api.HEALTH, Api.FLEET):
        return api, None
    if api is Api.CONTROL:
        if presented_token is None:
            return api, Refusal(401, "no-credential",
                                "the control API is the operator's: present its control token "
                                "(Authorization: Bearer)")
        if not control_token or not hmac.compare_digest(presented_token.encode(),
                                                         control_token.encode()):
            return api, Refusal(403, "wrong-credential",
                                "the control API is the operator's: this token is not its token")
        return api, None
    if is_loopback(peer_host):
        return api, None
    return api, Refusal(403, "not-local",
                        f"the {api.value} API is served only to the server's own processes")


def read_token(path: Path | None) -> str | None:
    """The control token in `path`, or None when it is missing or empty (then every control
    call is refused: a server without the operator's token has no operator)."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return token or None


class ServerGate:
    """ASGI middleware: passes a request to Flower's app only when `decide` allows it."""

    def __init__(self, app: App, token_file: Path | None) -> None:
        self.app = app
        self.token_file = token_file

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: Flower's start-up and shut-down
            await self.app(scope, receive, send)
            return
        raw = scope.get("raw_path") or scope["path"].encode()
        raw_path = raw.decode("latin-1").partition("?")[0]
        peer = (scope.get("client") or (None, None))[0]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        presented = bearer_token(headers.get("authorization"))
        # Read the token only for control calls that present one: nobody else needs it.
        is_control = raw_path.startswith("/v1/control/")
        token = read_token(self.token_file) if is_control and presented else None
        api, refusal = decide(raw_path, peer, presented, token)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        REFUSED_REQUESTS.labels(api.value, refusal.reason).inc()
        # The path is cut short: it is the caller's text. The token is never logged.
        log.warning("refused %s", json.dumps({
            "api": api.value, "path": raw_path[:200], "peer": peer, "status": refusal.status,
            "reason": refusal.reason}))
        body = f"pollinate server: {refusal.message}\n".encode()
        await send({"type": "http.response.start", "status": refusal.status, "headers": [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
