"""The slice of kubelet's HTTPS API that `kubectl logs` needs: /containerLogs.

`kubectl logs` asks the API server, which calls the node's kubelet at the node's InternalIP
and daemonEndpoints port. The agent serves that for all its nodes on the bridge address, so
`kubectl logs [-f] [--previous] [--tail N] pod` work as on a real cluster. The same files can
be read directly: see `pod_worker.container_log`. The API server does not verify kubelet
certificates here (no --kubelet-certificate-authority), so a self-signed one does.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from . import pki

log = logging.getLogger(__name__)

KUBELET_PORT_BASE = 10250
FOLLOW_POLL = 0.2

# (namespace, pod, container, previous) -> (log file, is the container still running?)
LogLocator = Callable[[str, str, str, bool], tuple[Path, Callable[[], bool]] | None]


def kubelet_port(network_index: int) -> int:
    return KUBELET_PORT_BASE + network_index


class KubeletServer:
    def __init__(self, address: str, port: int, pki_dir: Path, locate: LogLocator) -> None:
        pki_dir.mkdir(parents=True, exist_ok=True)
        ca = pki.make_ca(pki_dir, "node-agent-ca")
        cert = pki.issue(ca, pki_dir, "kubelet", "pollinate-node-agent", server=True,
                         ip_addresses=(address,))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert.cert, cert.key)
        handler = _handler(locate)
        self.server = ThreadingHTTPServer((address, port), handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = port
        self._thread = threading.Thread(target=self.server.serve_forever, name="kubelet-api", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(locate: LogLocator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            parts = url.path.strip("/").split("/")
            if url.path == "/healthz":
                self._send_text(200, "ok")
                return
            if len(parts) != 4 or parts[0] != "containerLogs":
                self._send_text(404, f"the node agent serves only /containerLogs, not {url.path}")
                return
            query = urllib.parse.parse_qs(url.query)

            def flag(name: str) -> bool:
                return query.get(name, ["false"])[0] in ("true", "1")

            found = locate(parts[1], parts[2], parts[3], flag("previous"))
            if found is None:
                self._send_text(404, f"no log of container {parts[3]} in pod {parts[1]}/{parts[2]}"
                                     f"{' (previous run)' if flag('previous') else ''}")
                return
            path, running = found
            data = path.read_bytes() if path.exists() else b""
            if "tailLines" in query:
                tail = int(query["tailLines"][0])
                data = b"".join(data.splitlines(keepends=True)[-tail:]) if tail else b""
            if "limitBytes" in query:
                data = data[: int(query["limitBytes"][0])]
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                self._chunk(data)
                if flag("follow"):
                    self._follow(path, path.stat().st_size if path.exists() else 0, running)
                self._chunk(b"")
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass

        def _follow(self, path: Path, offset: int, running: Callable[[], bool]) -> None:
            while True:
                still_running = running()
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
                if data:
                    offset += len(data)
                    self._chunk(data)
                elif not still_running:
                    return
                time.sleep(FOLLOW_POLL)

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _send_text(self, status: int, text: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:
            log.debug("kubelet api: " + format, *args)

    return Handler
