"""A local HTTP server on 127.0.0.1 that plays a cloud's instance metadata service for the spot watcher's tests:
AWS's IMDSv2 (a session token from a PUT, reads that must carry it; spot/instance-action and the rebalance
recommendation, 404 until set) and GCP's metadata server (instance/preempted, only with Metadata-Flavor: Google).
`down` makes it drop every connection unanswered, as a metadata service out of reach does."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class MetadataServer:
    def __init__(self) -> None:
        self.instance_action: dict | None = None  # {"action": "terminate", "time": "...Z"}
        self.rebalance: dict | None = None  # {"noticeTime": "...Z"}
        self.preempted = False
        self.down = False
        self.tokens: set[str] = set()
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _answer(self, status: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _seen(self) -> bool:
                server.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                if server.down:
                    self.close_connection = True
                    self.connection.close()  # no answer at all
                    return False
                return True

            def do_PUT(self) -> None:
                if not self._seen():
                    return
                if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._answer(400)
                token = f"token-{len(server.tokens)}"
                server.tokens.add(token)
                self._answer(200, token)

            def do_GET(self) -> None:
                if not self._seen():
                    return
                if self.path.startswith("/latest/meta-data/"):
                    if self.headers.get("X-aws-ec2-metadata-token") not in server.tokens:
                        return self._answer(401)
                    item = {
                        "/latest/meta-data/spot/instance-action": server.instance_action,
                        "/latest/meta-data/events/recommendations/rebalance": server.rebalance,
                    }.get(self.path)
                    return self._answer(404) if item is None else self._answer(200, json.dumps(item))
                if self.path == "/computeMetadata/v1/instance/preempted":
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._answer(403)
                    return self._answer(200, "TRUE" if server.preempted else "FALSE")
                self._answer(404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def interrupt_in(self, seconds: float, action: str = "terminate") -> None:
        """AWS's spot/instance-action for an interruption `seconds` from now."""
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds))
        self.instance_action = {"action": action, "time": at}

    def expire_tokens(self) -> None:
        self.tokens.clear()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
