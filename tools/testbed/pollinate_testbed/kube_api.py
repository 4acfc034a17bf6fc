"""A small Kubernetes REST client for the node agent: JSON in, JSON out, plus watches.

The agent handles pods as plain dicts (it copies fields between specs and statuses, it does
not need typed models), talks to one API server with one client certificate, and must stay
cheap on a 2-core machine: so it speaks HTTP/1.1 over keep-alive connections itself instead
of bringing the full client library and its model (de)serialisation.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class ApiError(RuntimeError):
    def __init__(self, status: int, method: str, path: str, body: dict | str) -> None:
        message = body.get("message", "") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.body = body

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


class WatchExpired(RuntimeError):
    """The resourceVersion a watch started from is gone (HTTP 410): list again."""


@dataclass(frozen=True)
class Credentials:
    server: str
    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def from_kubeconfig(cls, kubeconfig: Path, directory: Path) -> Credentials:
        """The current context's server and client certificate, written as files for `ssl`."""
        config = yaml.safe_load(kubeconfig.read_text())
        context_name = config["current-context"]
        context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
        directory.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, data in (("ca.crt", cluster["certificate-authority-data"]),
                           ("client.crt", user["client-certificate-data"]),
                           ("client.key", user["client-key-data"])):
            path = directory / name
            path.write_bytes(base64.b64decode(data))
            path.chmod(0o600)
            files[name] = path
        return cls(cluster["server"], files["ca.crt"], files["client.crt"], files["client.key"])


class KubeApi:
    """Blocking calls, safe from many threads: each thread keeps its own connection."""

    def __init__(self, credentials: Credentials, timeout: float = 30) -> None:
        url = urllib.parse.urlsplit(credentials.server)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 443
        self.timeout = timeout
        self._ssl = ssl.create_default_context(cafile=str(credentials.ca_file))
        self._ssl.load_cert_chain(credentials.cert_file, credentials.key_file)
        self._local = threading.local()

    # ---- plain requests --------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None, *,
                content_type: str = JSON, query: dict | None = None) -> dict:
        url = path + ("?" + urllib.parse.urlencode(query) if query else "")
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": JSON, "Content-Type": content_type}
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, url, body=payload, headers=headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError, OSError):
                # A keep-alive connection the server closed: reconnect once.
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        parsed: dict | str
        try:
            parsed = json.loads(data) if data else {}
        except json.JSONDecodeError:
            parsed = data.decode(errors="replace")
        if response.status >= 400:
            raise ApiError(response.status, method, path, parsed)
        return parsed if isinstance(parsed, dict) else {}

    def get(self, path: str, **query) -> dict:
        return self.request("GET", path, query=query or None)

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def patch(self, path: str, body: dict, content_type: str = STRATEGIC_MERGE_PATCH) -> dict:
        return self.request("PATCH", path, body, content_type=content_type)

    def delete(self, path: str, body: dict | None = None) -> dict:
        return self.request("DELETE", path, body)

    def _connection(self) -> http.client.HTTPSConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(self.host, self.port, context=self._ssl,
                                               timeout=self.timeout)
            self._local.conn = conn
        return conn

    # ---- watches ---------------------------------------------------------------------
    def watch(self, path: str, resource_version: str, timeout_seconds: int = 300) -> Iterator[dict]:
        """Events after `resource_version` until the server ends the watch."""
        query = urllib.parse.urlencode({
            "watch": "1", "resourceVersion": resource_version,
            "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds),
        })
        conn = http.client.HTTPSConnection(self.host, self.port, context=self._ssl,
                                           timeout=timeout_seconds + 30)
        try:
            conn.request("GET", f"{path}?{query}", headers={"Accept": JSON})
            response = conn.getresponse()
            if response.status >= 400:
                raise ApiError(response.status, "WATCH", path, response.read().decode(errors="replace"))
            while line := response.readline():
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object", {})
                    if status.get("code") == 410:
                        raise WatchExpired(status.get("message", "resource version expired"))
                    raise ApiError(status.get("code", 500), "WATCH", path, status)
                yield event
        finally:
            conn.close()


class Informer:
    """List, then watch, one kind of object forever, calling `handler(event_type, obj)`.

    After a re-list (a broken or expired watch) objects that vanished meanwhile are reported
    as DELETED, so the handler sees every object's last state exactly as a watch would.
    """

    def __init__(self, api: KubeApi, path: str, handler: Callable[[str, dict], None],
                 stop: threading.Event) -> None:
        self.api = api
        self.path = path
        self.handler = handler
        self.stop = stop
        self.synced = threading.Event()
        self._known: dict[str, dict] = {}

    def run(self) -> None:
        backoff = 0.5
        while not self.stop.is_set():
            try:
                version = self._list()
                self.synced.set()
                backoff = 0.5
                while not self.stop.is_set():
                    for event in self.api.watch(self.path, version):
                        version = event["object"]["metadata"].get("resourceVersion", version)
                        if event["type"] != "BOOKMARK":
                            self._dispatch(event["type"], event["object"])
                        if self.stop.is_set():
                            return
            except WatchExpired:
                continue
            except Exception as err:  # a watch must outlive API hiccups
                if self.stop.is_set():
                    return
                log.warning("watch %s failed, listing again in %.1f s: %s", self.path, backoff, err)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 10)

    def _list(self) -> str:
        listing = self.api.get(self.path)
        seen = {}
        for item in listing.get("items", []):
            seen[_key(item)] = item
            self._dispatch("ADDED" if _key(item) not in self._known else "MODIFIED", item)
        for key, obj in list(self._known.items()):
            if key not in seen:
                self._dispatch("DELETED", obj)
        return listing["metadata"]["resourceVersion"]

    def _dispatch(self, event_type: str, obj: dict) -> None:
        key = _key(obj)
        if event_type == "DELETED":
            self._known.pop(key, None)
        else:
            self._known[key] = obj
        try:
            self.handler(event_type, obj)
        except Exception:
            log.exception("handling %s of %s failed", event_type, key)


def _key(obj: dict) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace', '')}/{meta['name']}/{meta.get('uid', '')}"

