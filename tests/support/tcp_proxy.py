"""A TCP forwarder for tests: stands in for a network path (an ingress controller, a link to
S3) that can come up late or be cut, while TLS and protocols stay end to end."""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    """Forwards 127.0.0.1:port to an upstream; can start late and can cut off for good."""

    def __init__(self, upstream_port: int, port: int, *, cut_after_bytes: int | None = None,
                 upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.port = port
        self.cut_after_bytes = cut_after_bytes
        self.forwarded = 0
        self.cut = threading.Event()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def start_after(self, seconds: float) -> threading.Timer:
        timer = threading.Timer(seconds, self.start)
        timer.start()
        return timer

    def _accept(self) -> None:
        assert self._listener is not None
        while not self.cut.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, upstream_bound: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if upstream_bound and self.cut_after_bytes is not None:
                    with self._lock:
                        self.forwarded += len(chunk)
                        over = self.forwarded > self.cut_after_bytes
                    if over:
                        self.stop()  # the server vanishes in the middle of a request
                        return
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.cut.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
