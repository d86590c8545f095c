"""A TCP proxy on loopback in front of the local S3 endpoint: it counts bytes and injects faults.

Put it in front of the endpoint (``AWS_ENDPOINT_URL`` pointing at the proxy) and
every byte a client exchanges with the store passes through it:

- `received` / `sent` count the bytes, measured outside the code that reads;
- `outage(seconds)` refuses and cuts every connection for a while;
- `trigger(pattern, seconds)` starts such an outage when a request containing
  ``pattern`` (e.g. ``b"PUT /bucket/run/step-00000002/"``) first passes, and cuts it;
- `faults(probability, kind)` resets a fraction of new connections or answers
  them with ``503 SlowDown``, as a throttled store does;
- `latency(seconds)` holds every chunk a client sends for that long before
  relaying it: a round trip added to each request, as a distant store has;
- `bandwidth(bytes_per_s)` holds each connection's responses to that rate: what
  one connection to an object store carries (~50-100 MB/s to S3), so that requests
  in parallel go faster than one after another, as they do there.

Loopback only; it stops with its ``with`` block (daemon threads, no retries of its own).
"""

from __future__ import annotations

import random
import socket
import threading
import time
from typing import Optional

SLOW_DOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: 104\r\n"
             b"Connection: close\r\n\r\n<?xml version=\"1.0\"?><Error><Code>SlowDown</Code>"
             b"<Message>Please reduce your request rate.</Message></Error>")


class StoreProxy:
    """Relays connections from ``127.0.0.1:<port>`` to ``upstream`` (host, port)."""

    def __init__(self, upstream: tuple[str, int], seed: int = 0):
        self.upstream = upstream
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self.received = 0
        """Bytes sent from the upstream to clients since the last `reset`."""
        self.sent = 0
        """Bytes sent from clients to the upstream since the last `reset`."""
        self.refused = 0
        """Connections refused, cut or answered 503 by an injected fault."""
        self._down_until = 0.0
        self._trigger: Optional[tuple[bytes, float]] = None
        self.triggered_at: Optional[float] = None
        self._fault_probability, self._fault_kind = 0.0, "reset"
        self._latency = 0.0
        self._bandwidth = 0.0
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._open: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- controls ---------------------------------------------------------------------------
    def reset(self) -> None:
        with self._lock:
            self.received = self.sent = self.refused = 0

    def outage(self, seconds: float) -> None:
        """Refuse and cut every connection for ``seconds`` from now."""
        with self._lock:
            self._down_until = time.monotonic() + seconds
            victims = list(self._open)
        for s in victims:
            _close(s)

    def trigger(self, pattern: bytes, seconds: float) -> None:
        """An outage of ``seconds`` starting when a client first sends bytes containing ``pattern``."""
        self._trigger = (pattern, seconds)

    def faults(self, probability: float, kind: str = "reset") -> None:
        """Each new connection: with ``probability``, reset at once (``reset``) or answered 503 (``slowdown``)."""
        if kind not in ("reset", "slowdown"):
            raise ValueError(f"unknown fault kind {kind!r}")
        self._fault_probability, self._fault_kind = probability, kind

    def latency(self, seconds: float) -> None:
        """Hold each chunk a client sends for ``seconds`` before relaying it (each connection on its own thread,
        so requests in flight on other connections are not held up)."""
        if seconds < 0:
            raise ValueError(f"latency must be >= 0 s, got {seconds}")
        self._latency = seconds

    def bandwidth(self, bytes_per_s: float) -> None:
        """Relay at most ``bytes_per_s`` from the upstream on each connection (0: no limit)."""
        if bytes_per_s < 0:
            raise ValueError(f"bandwidth must be >= 0, got {bytes_per_s}")
        self._bandwidth = float(bytes_per_s)

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    # -- relaying ---------------------------------------------------------------------------
    def __enter__(self) -> "StoreProxy":
        threading.Thread(target=self._accept, name="store-proxy", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.close()
        for s in list(self._open):
            _close(s)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.down or (self._fault_probability and self._rng.random() < self._fault_probability):
                self._refuse(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open |= {client, upstream}
            for src, dst, down in ((upstream, client, True), (client, upstream, False)):
                threading.Thread(target=self._pump, args=(src, dst, down), daemon=True).start()

    def _refuse(self, client: socket.socket) -> None:
        with self._lock:
            self.refused += 1
        if self._fault_kind == "slowdown" and not self.down:
            try:
                client.recv(1 << 16)
                client.sendall(SLOW_DOWN)
            except OSError:
                pass
        _close(client)

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if not down and self._trigger is not None and self._trigger[0] in data:
                    pattern, seconds = self._trigger
                    self._trigger, self.triggered_at = None, time.monotonic()
                    self.outage(seconds)
                    return
                if not down and self._latency:
                    time.sleep(self._latency)
                if self.down:
                    return
                bandwidth = self._bandwidth  # read once: it may be changed meanwhile
                if down and bandwidth:  # each chunk waits its time on the wire (no credit for idle time)
                    time.sleep(len(data) / bandwidth)
                dst.sendall(data)
                with self._lock:
                    if down:
                        self.received += len(data)
                    else:
                        self.sent += len(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open -= {src, dst}
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
