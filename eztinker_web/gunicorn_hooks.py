"""gunicorn hooks of the web process (loaded with ``--config python:eztinker_web.gunicorn_hooks``).

A long-poll (``GET /v1/futures/<id>?wait=30``) holds a request thread for up to 30 s. When the
web process stops, those requests answer at once with the future's current state (clients poll
again), so the process exits promptly instead of being killed after the graceful timeout.
"""

from __future__ import annotations

import signal
from typing import Any

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
    """On SIGTERM (graceful stop) answer the long-polls, then stop as gunicorn does."""
    stop = worker.handle_exit

    def handle_exit(sig: int, frame: Any) -> None:
        _close_long_polls(worker)
        stop(sig, frame)

    signal.signal(signal.SIGTERM, handle_exit)


def worker_int(worker: Any) -> None:
    """SIGINT / SIGQUIT (quick stop, Ctrl-C): answer the long-polls before the threads join."""
    _close_long_polls(worker)
