"""A real S3 API on localhost (moto server) behind a fault-injecting HTTP proxy, for tests and
benchmarks.

The proxy forwards every request unchanged (the Host header too, so SigV4 signatures still match)
and, deterministically, answers some of them the way object stores fail under load:

* ``503``: ``503 SlowDown`` (the request never reaches the server);
* ``500``: ``500 InternalError``;
* ``reset``: the connection is reset before the request is forwarded;
* ``lost``: the request is forwarded (the server did it) and the connection reset before the answer;
* ``truncate``: the answer's headers and half its body, then the connection closes (a cut GET).

Faults follow a :class:`FaultPlan`: every ``every``-th request of each operation (listing, read,
write...) that ``match`` selects gets the next kind of ``kinds`` in turn, so each operation is
faulted as planned whatever the timing.  ``latency_s`` is
added to every request; :meth:`FaultProxy.gate` holds the first ``n`` GETs until ``n`` are waiting
at once (a run that keeps fewer in flight breaks the gate instead of passing by luck).
"""

from __future__ import annotations

import http.client
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade",
              "expect", "trailer"}
# aiohttp drops what it buffered once the connection is gone, so the cut is made some time after
# the half body was sent: long enough for the client's event loop to take it.
TRUNCATE_PAUSE_S = 0.5
ERROR_XML = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass
class Request:
    method: str
    path: str     # /bucket/key
    query: str
    range: Optional[str]
    fault: Optional[str]
    status: Optional[int] = None
    sent: int = 0  # body bytes sent back


def first_only(pred: Callable[[str, str, str], bool]) -> Callable[[str, str, str], bool]:
    """``pred`` for the first request it selects, False after that."""
    hit = []

    def once(method: str, path: str, query: str) -> bool:
        if hit or not pred(method, path, query):
            return False
        hit.append(path)
        return True
    return once


def operation(method: str, path: str, query: str) -> str:
    """``LIST`` for a bucket listing, else the HTTP method (``GET`` is an object read)."""
    return "LIST" if method == "GET" and "list-type=" in query else method


@dataclass
class FaultPlan:
    """Every ``every``-th request of each operation (LIST, GET, PUT, HEAD...) that ``match``
    selects gets the next of ``kinds``; requests that ``always`` selects get ``always_kind``."""
    every: int = 0                                  # 0: no faults
    kinds: tuple[str, ...] = ("503", "500", "reset")
    match: Callable[[str, str, str], bool] = lambda method, path, query: True
    always: Optional[Callable[[str, str, str], bool]] = None
    always_kind: str = "503"
    _seen: dict = field(default_factory=dict, repr=False)

    def decide(self, method: str, path: str, query: str) -> Optional[str]:
        if self.always is not None and self.always(method, path, query):
            return self.always_kind
        if not self.every or not self.match(method, path, query):
            return None
        op = operation(method, path, query)
        n = self._seen[op] = self._seen.get(op, 0) + 1
        if n % self.every:
            return None
        return self.kinds[(n // self.every - 1) % len(self.kinds)]


class FaultProxy:
    """``FaultProxy(upstream).endpoint`` is an S3 endpoint URL with faults per :attr:`plan`."""

    def __init__(self, upstream: str, plan: Optional[FaultPlan] = None, latency_s: float = 0.0) -> None:
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.plan = plan or FaultPlan()
        self.latency_s = latency_s
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate_broken = False
        self._gate: Optional[threading.Barrier] = None
        self._gate_left = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.request_queue_size = 1024
        self.server.proxy = self  # type: ignore[attr-defined]
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- what tests look at
    def set_plan(self, plan: FaultPlan) -> None:
        with self._lock:
            self.plan = plan

    def reset_log(self) -> None:
        with self._lock:
            self.requests = []
            self.max_in_flight = 0

    def faults(self) -> list[Request]:
        return [r for r in self.requests if r.fault]

    def gate(self, n: int, timeout_s: float = 60.0) -> None:
        """Hold the next ``n`` GETs until all ``n`` are in flight together."""
        self._gate = threading.Barrier(n, timeout=timeout_s)
        self._gate_left = n
        self.gate_broken = False

    # -- the proxy
    def _begin(self, method: str, target: str, rng: Optional[str]) -> Request:
        parts = urlsplit(target)
        with self._lock:
            fault = self.plan.decide(method, parts.path, parts.query)
            req = Request(method, parts.path, parts.query, rng, fault)
            self.requests.append(req)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            gate = None
            if self._gate is not None and method == "GET" and self._gate_left > 0:
                self._gate_left -= 1
                gate = self._gate
        if gate is not None:
            try:
                gate.wait()
            except threading.BrokenBarrierError:
                self.gate_broken = True
        return req

    def _end(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _forward(self, method: str, target: str, headers: list[tuple[str, str]],
                 body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        for attempt in range(2):  # a kept-alive upstream connection may have been closed meanwhile
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(*self.upstream, timeout=120)
            try:
                conn.request(method, target, body=body or None, headers=dict(headers))
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.reason, resp.getheaders(), data
            except (http.client.HTTPException, ConnectionError, BrokenPipeError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real endpoint

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if not size:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _proxy(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._body()
        req = proxy._begin(self.command, self.path, self.headers.get("Range"))
        try:
            if proxy.latency_s:
                time.sleep(proxy.latency_s)
            if req.fault == "reset":
                return self._reset()
            if req.fault in ERROR_XML:
                return self._error(req)
            headers = [(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP]
            if body:
                headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
                headers.append(("Content-Length", str(len(body))))
            status, reason, up_headers, data = proxy._forward(self.command, self.path, headers, body)
            req.status = status
            if req.fault == "lost":
                return self._reset()
            cut = req.fault == "truncate" and self.command == "GET" and len(data) > 1
            self.send_response_only(status, reason)
            for k, v in up_headers:
                if k.lower() in HOP_BY_HOP or (k.lower() == "content-length" and self.command != "HEAD"):
                    continue
                self.send_header(k, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                sent = data[: len(data) // 2] if cut else data
                self.wfile.write(sent)
                req.sent = len(sent)
            if cut:  # half the body, a pause (the client takes what came), then a clean close
                self.wfile.flush()
                time.sleep(TRUNCATE_PAUSE_S)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
        finally:
            proxy._end()

    def _error(self, req: Request) -> None:
        status, code, message = ERROR_XML[req.fault]
        req.status = status
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
               f"</Message><RequestId>fault-proxy</RequestId></Error>").encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)

    def _reset(self) -> None:
        """Drop the connection with a TCP reset (SO_LINGER 0), as a crashed front end does."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass


def start_moto() -> tuple[object, str]:
    """A moto S3 server on 127.0.0.1 (any port): ``(server, endpoint)``; ``server.stop()`` ends it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"
