"""A fault-injecting HTTP proxy in front of moto's S3 server, on 127.0.0.1: forwards every request, or answers
503 SlowDown to those a rule picks (e.g. the first N writes, or every write under manifests/)."""
from __future__ import annotations

import http.client
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your '
             b'request rate.</Message></Error>')


class FaultProxy:
    """`rule(method, path) -> bool`: answer 503 when it returns True. `failed` counts the 503s answered."""

    def __init__(self, upstream: str):
        u = urlparse(upstream)
        self.up_host, self.up_port = u.hostname, u.port
        self.rule = lambda method, path: False
        self.failed = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("content-length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                with proxy.lock:
                    fail = proxy.rule(self.command, self.path)
                    proxy.failed += fail
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "content-length", "expect", "connection")}
                headers["Content-Length"] = str(len(body))
                c = http.client.HTTPConnection(proxy.up_host, proxy.up_port, timeout=30)
                try:
                    c.request(self.command, self.path, body=body, headers=headers)
                    r = c.getresponse()
                    data = r.read()
                finally:
                    c.close()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                        self.send_header(k, v)
                # a HEAD answer carries the object's length, not its (empty) body's
                length = r.getheader("content-length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail_first_writes(self, n: int, pattern: str = "") -> None:
        """503 for the next `n` PUT/POST requests whose path matches `pattern`, then pass everything."""
        left = [n]
        rx = re.compile(pattern)

        def rule(method, path):
            if method in ("PUT", "POST") and rx.search(path) and left[0] > 0:
                left[0] -= 1
                return True
            return False

        self.rule = rule

    def fail_writes(self, pattern: str = "") -> None:
        rx = re.compile(pattern)
        self.rule = lambda method, path: method in ("PUT", "POST") and bool(rx.search(path))

    def heal(self) -> None:
        self.rule = lambda method, path: False

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
