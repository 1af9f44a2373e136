"""An HTTP proxy on loopback that makes an S3 endpoint misbehave: put it in front of moto's server and point
s3fs at it (``endpoint_url``). A seeded share of the requests is answered with a fault instead of the server's
answer, for as long as the proxy runs; every other request is forwarded as it came (method, path, query,
headers, the Host header the client signed, body) and its answer sent back as the server gave it.

The faults (``FaultProxy.counts`` says how many of each were injected):

- ``slowdown``: ``503 SlowDown`` with S3's XML error body; the server never sees the request.
- ``internal``: ``500 InternalError`` with S3's XML error body; the server never sees the request.
- ``drop-before``: the connection is closed without an answer before the request is forwarded.
- ``drop-after``: the request is forwarded (the server applies it: a PUT is stored, a DELETE done), then the
  connection is closed without an answer: the client cannot tell whether it happened.
- ``drop-mid-body``: the answer's status line, headers and half of its body are sent, then the connection is
  closed (a read cut short; for an answer with no body, the same as ``drop-after``).
- ``slow``: the request is held ``slow_s`` seconds, then forwarded and answered normally.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("slowdown", "internal", "drop", "slow")
DROPS = ("drop-before", "drop-after", "drop-mid-body")
# headers that describe one connection, not the request: not forwarded (SigV4 signs none of them). ``Expect:
# 100-continue`` is answered by the proxy itself (http.server sends the 100), which has the body when it forwards.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"}

_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}


class FaultProxy:
    """A threaded proxy from ``url`` (loopback, a free port) to ``upstream`` (``http://host:port``) that answers
    about ``share`` of the requests with one of ``kinds`` (chosen uniformly, a drop's variant too), from a
    generator seeded with ``seed``. ``start()``/``stop()``, or use it as a context manager."""

    def __init__(
        self,
        upstream: str,
        *,
        share: float = 0.08,
        seed: int = 0,
        kinds: tuple[str, ...] = KINDS,
        slow_s: tuple[float, float] = (0.2, 1.0),
    ) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.share = share
        self.kinds = kinds
        self.slow_s = slow_s
        self.counts: Counter[str] = Counter()  # faults injected, by kind ("drop-*" by variant)
        self.requests = 0  # every request the proxy received
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def draw(self) -> tuple[str | None, float]:
        """The fault for the next request (None: forward it as it is) and, for a slow one, its delay."""
        with self._lock:
            self.requests += 1
            if self.share <= 0 or self._rng.random() >= self.share:
                return None, 0.0
            kind = self._rng.choice(self.kinds)
            if kind == "drop":
                kind = self._rng.choice(DROPS)
            delay = self._rng.uniform(*self.slow_s) if kind == "slow" else 0.0
            self.counts[kind] += 1
            return kind, delay


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_ProxyHandler):
        pass

    Handler.proxy = proxy
    return Handler


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    proxy: FaultProxy

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _proxy(self) -> None:
        body = self._read_body()
        kind, delay = self.proxy.draw()
        if kind in _ERRORS:
            self._send_error(*_ERRORS[kind])
            return
        if kind == "drop-before":
            self._drop()
            return
        if kind == "slow":
            time.sleep(delay)
        status, reason, headers, payload = self._forward(body)
        if kind == "drop-after" or (kind == "drop-mid-body" and len(payload) < 2):
            self._drop()
            return
        self.send_response_only(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if kind == "drop-mid-body":
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self._drop()
            return
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _read_body(self) -> bytes:
        """The request's body as it came: ``Content-Length`` bytes, or the raw chunks of a chunked one."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the empty line
                        trailer = self.rfile.readline()
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request upstream with the client's headers (its Host included) on a fresh connection."""
        conn = http.client.HTTPConnection(*self.proxy.upstream, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Connection"] = "close"
            # http.client keeps a Host given in the headers and adds no Content-Length when the body is chunked
            conn.request(self.command, self.path, body=body or None, headers=headers, encode_chunked=False)
            resp = conn.getresponse()
            payload = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP | {"transfer-encoding"}]
            if self.command != "HEAD":  # a HEAD answer keeps the object's Content-Length
                out = [(k, v) for k, v in out if k.lower() != "content-length"]
                out.append(("Content-Length", str(len(payload))))
            return resp.status, resp.reason, out, payload
        finally:
            conn.close()

    def _send_error(self, status: int, reason: str, code: str, message: str) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>{request_id}</RequestId>"
            f"<HostId>fault-proxy</HostId></Error>"
        ).encode()
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)

    def _drop(self) -> None:
        """Close the client's connection now, without (the rest of) an answer."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
