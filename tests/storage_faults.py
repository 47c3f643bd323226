"""A fault layer in front of the local S3 server: an HTTP proxy on 127.0.0.1 that fails the requests a plan
names, the ways storage fails in the field, and logs every request so a test can count the retries.

Faults (each as S3 or the network gives it):
  "503"    503 SlowDown with S3's XML error body (throttling);
  "500"    500 InternalError with S3's XML error body;
  "reset"  the connection reset (RST) before any answer;
  "cut"    an upload's body cut mid-stream (half read, then reset), or a download's body cut mid-stream (the
           headers and half the body, then reset);
  "stall"  no answer for stall_s (longer than the client's request timeout), then the connection closed.

A Fault picks requests by method and a regex searched in "bucket/key?query", then the nth matching requests
(1-based, counted per Fault), a rate (seeded: a plan repeats), or all of them, up to `times` injections, and
only while it is active (an outage: from when it is switched on for `seconds`, or until healed). The proxy runs
in the test's process, on its own threads; Ray workers reach it like any S3 endpoint (AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["Fault", "FaultyS3"]

KINDS = ("503", "500", "reset", "cut", "stall")
_ERRORS = {
    "503": ("SlowDown", "Please reduce your request rate."),
    "500": ("InternalError", "We encountered an internal error. Please try again."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


@dataclass
class Fault:
    kind: str
    method: str | None = None  # GET, PUT, POST, HEAD, DELETE; None: any
    key: str = ""  # regex searched in "bucket/key?query"; "": any
    nth: tuple[int, ...] = ()  # the nth matching requests (1-based); () with rate 0: every matching request
    rate: float = 0.0  # or each matching request with this probability (the plan's seeded generator)
    times: int | None = None  # at most this many injections
    stall_s: float = 30.0
    active: bool = True  # False: waits for FaultyS3.outage() to switch it on
    until: float | None = None  # time.monotonic() when it switches off by itself
    seen: int = field(default=0, init=False)  # matching requests so far
    injected: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"fault kind {self.kind!r} is not one of {KINDS}")

    def matches(self, method: str, target: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        return re.search(self.key, target) is not None

    def fires(self, rng: random.Random) -> bool:
        """Called for each matching request while active: whether this one fails."""
        self.seen += 1
        if self.times is not None and self.injected >= self.times:
            return False
        if self.nth:
            hit = self.seen in self.nth
        elif self.rate:
            hit = rng.random() < self.rate
        else:
            hit = True
        self.injected += hit
        return hit


@dataclass
class Entry:
    t: float  # seconds since the proxy started
    method: str
    target: str  # bucket/key?query
    outcome: str  # the fault injected, or the upstream status as text


class FaultyS3:
    """The proxy: FaultyS3(upstream_port, faults, seed).endpoint is what clients take as AWS_ENDPOINT_URL."""

    def __init__(self, upstream_port: int, faults: list[Fault] | None = None, seed: int = 0) -> None:
        self.upstream_port = upstream_port
        self.faults: list[Fault] = list(faults or [])
        self.rng = random.Random(seed)
        self.log: list[Entry] = []
        self.lock = threading.Lock()
        self.started = time.monotonic()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    # -- the plan ---------------------------------------------------------------------------------------------
    def add(self, *faults: Fault) -> None:
        with self.lock:
            self.faults.extend(faults)

    def outage(
        self, kind: str = "503", seconds: float | None = None, method: str | None = None, key: str = ""
    ) -> Fault:
        """Every matching request fails from now, for `seconds` (None: until heal())."""
        fault = Fault(kind, method=method, key=key, until=None if seconds is None else time.monotonic() + seconds)
        self.add(fault)
        return fault

    def when_answered(
        self, key: str, then, method: str | None = None, timeout: float = 300, methods: tuple[str, ...] = ()
    ) -> threading.Thread:
        """Call then() (on a thread of its own) as soon as the proxy has answered a request of method (or one of
        methods) whose target matches key with a 200: a fault plan's next phase, started at a point of a job's
        progress."""
        methods = methods or ((method,) if method else ())

        def watch():
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                entries = self.entries(key=key)
                if any(e.outcome == "200" and (not methods or e.method in methods) for e in entries):
                    then()
                    return
                time.sleep(0.05)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread

    def when_stored(self, key: str, then, timeout: float = 300) -> threading.Thread:
        """Call then() as soon as an object whose key matches `key` (a regex, up to the key's end) is stored whole:
        a single PUT answered, or a multipart upload's completion (POST ?uploadId=). An uploaded part is not yet
        an object: a fault plan started at one would fail the completion, and the object would never exist."""
        return self.when_answered(rf"{key}(\?uploadId=[^&]*)?$", then, timeout=timeout, methods=("PUT", "POST"))

    def heal(self) -> None:
        """No more faults: storage is healthy again."""
        with self.lock:
            self.faults.clear()

    def _decide(self, method: str, target: str) -> Fault | None:
        now = time.monotonic()
        with self.lock:
            for fault in self.faults:
                if not fault.active or (fault.until is not None and now >= fault.until):
                    continue
                if fault.matches(method, target) and fault.fires(self.rng):
                    return fault
        return None

    # -- what happened ----------------------------------------------------------------------------------------
    def record(self, method: str, target: str, outcome: str) -> None:
        with self.lock:
            self.log.append(Entry(round(time.monotonic() - self.started, 3), method, target, outcome))

    def entries(self, method: str | None = None, key: str = "") -> list[Entry]:
        with self.lock:
            return [e for e in self.log if (method is None or e.method == method) and re.search(key, e.target)]

    def injected(self) -> Counter:
        """Faults injected so far, by kind."""
        return Counter(e.outcome for e in self.entries() if e.outcome in KINDS)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A client hanging up on the layer is what its own resets and stalls cause all day: not worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _error_body(code: str, message: str, target: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>/{target.partition('?')[0]}</Resource>"
        f"<RequestId>{random.getrandbits(64):016X}</RequestId></Error>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    owner: FaultyS3
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect; also answers Expect: 100-continue

    def log_message(self, *args) -> None:  # the proxy's own log is FaultyS3.log
        pass

    def do_GET(self):
        self._handle()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

    def _handle(self) -> None:
        target = self.path.lstrip("/")
        fault = self.owner._decide(self.command, target)
        length = int(self.headers.get("Content-Length") or 0)
        chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"  # pyarrow's uploads: aws-chunked
        if fault is not None and fault.kind == "cut" and (length > 0 or chunked):  # the upload cut mid-body
            if chunked:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                self.rfile.read(size // 2)
            else:
                self.rfile.read(length // 2)
            self.owner.record(self.command, target, "cut")
            return self._reset()
        body = self._request_body(length)
        if fault is not None and fault.kind in ("reset", "stall"):
            self.owner.record(self.command, target, fault.kind)
            if fault.kind == "stall":
                time.sleep(fault.stall_s)
                self.close_connection = True
                return
            return self._reset()
        if fault is not None and fault.kind in _ERRORS:
            self.owner.record(self.command, target, fault.kind)
            code, message = _ERRORS[fault.kind]
            payload = _error_body(code, message, target)
            self.send_response(int(fault.kind))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        status, headers, payload = self._forward(body)
        cut = fault is not None and bool(payload) and self.command != "HEAD"  # a download cut mid-body
        self.owner.record(self.command, target, "cut" if cut else str(status))
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        declared = next((v for k, v in headers if k.lower() == "content-length"), None)
        self.send_header("Content-Length", declared if self.command == "HEAD" and declared else str(len(payload)))
        self.end_headers()
        if cut:  # half of the body, then reset
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            return self._reset()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _request_body(self, length: int) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes):
        upstream = http.client.HTTPConnection("127.0.0.1", self.owner.upstream_port, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            return response.status, response.getheaders(), payload
        finally:
            upstream.close()

    def _reset(self) -> None:
        """Close with an RST, as a dropped connection looks to the client."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def finish(self) -> None:
        try:
            super().finish()
        except (OSError, ValueError):  # the connection was reset on purpose
            pass
