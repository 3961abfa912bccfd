"""The service's HTTP endpoints (standard library, one thread per request): /healthz, /metrics, /sources."""
from __future__ import annotations

import errno
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import PetalError
from .metrics import CONTENT_TYPE


class _Handler(BaseHTTPRequestHandler):
    service = None  # set on the subclass made per server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.service.metrics_text().encode(), CONTENT_TYPE)
        elif path == "/sources":
            self._json(200, self.service.sources_status())
        elif path == "/healthz":
            health = self.service.health()
            self._json(200 if health["status"] == "ok" else 503, health)
        else:
            self._json(404, {"error": f"no such endpoint {path}", "endpoints": ["/healthz", "/metrics", "/sources"]})

    def _json(self, code: int, body: dict) -> None:
        self._send(code, (json.dumps(body, indent=1) + "\n").encode(), "application/json")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # scrapes every few seconds: not worth a log line each
        pass


class HttpServer:
    def __init__(self, service, host: str, port: int) -> None:
        handler = type("Handler", (_Handler,), {"service": service})
        try:
            self.server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            why = "the port is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise PetalError(f"cannot listen on {host}:{port}: {why} (set [http] port, or enabled = false)") from None
        self.server.daemon_threads = True
        self.host, self.port = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="petal-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()
