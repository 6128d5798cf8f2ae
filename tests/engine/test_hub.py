"""A hub model that cannot be fetched fails at once, not after the hub client's retries."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from engine_helpers import new_run

from eztinker_tasks.engine import Engine, hub
from eztinker_tasks.errors import UnknownModel


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_uncached_model_with_the_hub_unreachable_fails_fast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.monotonic()
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(UnknownModel, match="cannot be reached") as info:
        hub.ensure_fetchable("someorg/not-cached-model", endpoint=endpoint)
    assert time.monotonic() - started < 10
    assert "tiny-gpt2" in info.value.message  # says what to use instead
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownModel, match="HF_HUB_OFFLINE"):
        hub.ensure_fetchable("someorg/not-cached-model")


def test_a_reachable_hub_lets_the_load_go_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(404)  # any answer means the hub is there
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub.ensure_fetchable("someorg/model", endpoint=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()


def test_engine_refuses_an_unloadable_hub_model_quickly(engine: Engine) -> None:
    # Offline (as here) the probe refuses it; online the hub answers 404: either way a clear
    # user error well before the hub client's own ~45 s of retries.
    started = time.monotonic()
    with pytest.raises(UnknownModel):
        new_run(engine, "r", base_model="eztinker-test/no-such-model")
    assert time.monotonic() - started < 30
