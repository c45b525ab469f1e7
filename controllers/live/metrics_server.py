"""The live controller's metrics endpoint, served from a process of its own.

`controllers.live.exporter.MetricsExporter` binds the listening socket, starts this file as a
script (``python metrics_server.py <fd>``, the socket inherited as file descriptor ``fd``) and
writes every rendering of its registry to the script's stdin, each as a 4-byte big-endian length
and the bytes. The script answers ``GET /metrics`` (and ``/``) with the last rendering received.
Scrapes are thus handled without the control loop's interpreter lock: however often and however
much Prometheus scrapes, the loop's only cost is one pipe write per decision. The script exits
when its stdin closes (the exporter closed, or the controller died); it ignores SIGINT and
SIGTERM, which a terminal or a service manager sends to the whole process group, so that it
outlives the loop's own orderly stop.

Standard library only, so that it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""Prometheus text exposition format 0.0.4 (what `prometheus_client.generate_latest` writes)."""

NICE = 10
"""Scheduling priority lowered by this much: the endpoint never takes a core from the loop."""


class _Handler(BaseHTTPRequestHandler):
    """GET /metrics (or /): the last rendering; anything else: 404."""

    server: SnapshotServer
    protocol_version = "HTTP/1.1"  # keep-alive: Prometheus reuses its connection
    disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body = self.server.body
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base signature)
        """No access log."""


class SnapshotServer(ThreadingHTTPServer):
    """An HTTP server on an already listening socket whose one content is ``body``."""

    daemon_threads = True

    def __init__(self, sock: socket.socket) -> None:
        self.address_family = sock.family
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()
        self.body = b""


def _read_exact(stream: Any, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_frame(stream: Any) -> bytes | None:
    """One rendering (4-byte big-endian length, then the bytes), or None at the end."""
    head = _read_exact(stream, 4)
    return None if head is None else _read_exact(stream, struct.unpack("!I", head)[0])


def serve(fd: int, stream: Any) -> None:
    """Serve on socket ``fd`` the renderings read from ``stream`` until it ends.

    The first rendering is read before the first request is answered (requests wait in the
    socket's backlog), so that no scrape ever gets an empty page.
    """
    if hasattr(os, "nice"):
        os.nice(NICE)  # under CPU contention the control loop comes first
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C reaches the whole process group:
        signal.signal(sig, signal.SIG_IGN)  # this process ends with its input, after the loop
    server = SnapshotServer(socket.socket(fileno=fd))
    body = _read_frame(stream)
    if body is None:
        server.server_close()
        return
    server.body = body
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                              daemon=True)
    thread.start()
    try:
        while (body := _read_frame(stream)) is not None:
            server.body = body
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.stdin.buffer)
