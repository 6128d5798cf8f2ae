"""gunicorn hooks of the web process (loaded with ``--config python:eztinker_web.gunicorn_hooks``).

A long-poll (``GET /v1/futures/<id>?wait=30``) holds a request thread for up to 30 s. When the
web process stops, those requests answer at once with the future's current state (clients poll
again), so the process exits promptly instead of being killed after the graceful timeout.

gunicorn answers some requests itself, before the app sees them: a request line over 4094
bytes (414), a malformed request line or header (400), too many header bytes (431). Its
answer is an HTML page; here it is the API's one JSON error envelope, like every other error.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import gunicorn.util

from eztinker_web.errors import envelope, error_code


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``util.write_error`` (same signature), answering in the error envelope."""
    body = json.dumps(envelope(status_int, error_code(status_int), mesg or reason)).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    gunicorn.util.write_nonblock(sock, head.encode("latin-1") + body)


# gunicorn >= 25.1 opens a control socket at one fixed path per user ($XDG_RUNTIME_DIR or
# ~/.gunicorn/gunicorn.ctl): every EZTinker web process (several servers, test stacks) would
# take it over from the others and unlink it when it stops. Nothing here uses it.
control_socket_disable = True


def _close_long_polls(worker: Any) -> None:
    app = getattr(worker, "wsgi", None)
    services = getattr(app, "extensions", {}).get("eztinker")
    if services is not None:
        services.close_long_polls()


def post_worker_init(worker: Any) -> None:
    """gunicorn's own error answers are JSON envelopes; on SIGTERM (graceful stop) answer the
    long-polls, then stop as gunicorn does."""
    # What gunicorn's Worker.handle_error calls (a module function, so replaced in place).
    gunicorn.util.write_error = write_json_error  # ty: ignore[invalid-assignment]
    stop = worker.handle_exit

    def handle_exit(sig: int, frame: Any) -> None:
        _close_long_polls(worker)
        stop(sig, frame)

    signal.signal(signal.SIGTERM, handle_exit)


def worker_int(worker: Any) -> None:
    """SIGINT / SIGQUIT (quick stop, Ctrl-C): answer the long-polls before the threads join."""
    _close_long_polls(worker)
