"""A TCP proxy on loopback that counts the bytes a store sends: what a client really read, measured outside it.

Put it in front of the local S3 endpoint (``AWS_ENDPOINT_URL`` pointing at the
proxy) and every byte s3fs receives passes through `received`. Used by the
benchmarks to measure reads independently of the code that reads.
"""

from __future__ import annotations

import socket
import threading
from typing import Optional


class CountingProxy:
    """Relays connections from ``127.0.0.1:<port>`` to ``upstream`` (host, port) and counts the bytes."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self.received = 0
        """Bytes sent from the upstream to clients since the last `reset`."""
        self.sent = 0
        """Bytes sent from clients to the upstream since the last `reset`."""
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.received = self.sent = 0

    def __enter__(self) -> "CountingProxy":
        self._thread = threading.Thread(target=self._accept, name="counting-proxy", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            for src, dst, down in ((upstream, client, True), (client, upstream, False)):
                threading.Thread(target=self._pump, args=(src, dst, down), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self._lock:
                    if down:
                        self.received += len(data)
                    else:
                        self.sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
