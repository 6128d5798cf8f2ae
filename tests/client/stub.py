"""A tiny scripted HTTP server (no EZTinker behind it) for transport, futures and CLI tests.

``stub.on("GET", "/v1/runs", Reply(200, {...}), DROP, ...)`` answers the listed replies in
order (the last one repeats); every request is recorded in ``stub.requests``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from eztinker import RetryPolicy

FAST_RETRY = RetryPolicy(max_retries=3, initial_delay=0.01, max_delay=0.05, jitter=0.0)


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    content_type: str = "application/json"


DROP = "drop"  # read the request, then close the connection without answering


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    json: Any
    headers: dict[str, str]


Handler = Reply | str | Callable[[Recorded], Reply | str]


class StubServer:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.routes: dict[tuple[str, str], list[Handler]] = {}
        self._lock = threading.Lock()
        stub = self

        class RequestHandler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                rec = Recorded(
                    self.command,
                    parts.path,
                    {k: v[0] for k, v in parse_qs(parts.query).items()},
                    json.loads(raw) if raw else None,
                    dict(self.headers.items()),
                )
                reply = stub._reply(rec)
                if reply == DROP:
                    self.close_connection = True
                    return
                assert isinstance(reply, Reply)
                data = reply.raw if reply.raw is not None else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(data)))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def on(self, method: str, path: str, *replies: Handler) -> None:
        self.routes[(method, path)] = list(replies)

    def hits(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path == path]

    def _reply(self, rec: Recorded) -> Reply | str:
        with self._lock:
            self.requests.append(rec)
            queue = self.routes.get((rec.method, rec.path))
            if not queue:
                return Reply(404, {"code": "not_found", "status": 404, "category": "user",
                                   "message": f"no stub for {rec.method} {rec.path}"})  # fmt: skip
            handler = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(handler, Reply | str):
            return handler
        return handler(rec)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
