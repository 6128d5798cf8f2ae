"""The web's hub check: torch-free, fast when the hub is unreachable, its answer remembered."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eztinker_tasks import hub_probe
from eztinker_tasks.errors import UnknownModel
from tests.conftest import REPO


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def _empty_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_probe, "is_cached", lambda repo_id: False)


def test_unreachable_hub_is_refused_fast_with_what_to_use() -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(UnknownModel, match="cannot be reached from the server") as info:
        hub_probe.ensure_fetchable("someorg/model", endpoint=endpoint, where="the server")
    assert time.monotonic() - started < hub_probe.PROBE_TIMEOUT_S + 2
    assert info.value.category == "user" and "tiny-gpt2" in info.value.message


def test_offline_flag_refuses_without_asking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownModel, match="HF_HUB_OFFLINE"):
        hub_probe.ensure_fetchable("someorg/model", endpoint="http://192.0.2.1:9")


def test_reachable_hub_passes_and_the_answer_is_remembered() -> None:
    heads: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            heads.append(self.path)
            self.send_response(404)  # any answer means the hub is there
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    try:
        for _ in range(5):
            hub_probe.ensure_fetchable("someorg/model", endpoint=endpoint)
    finally:
        server.shutdown()
    assert len(heads) == 1  # one probe per endpoint per minute, however many requests ask


def test_the_check_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from eztinker_tasks import hub_probe\n"
        "hub_probe.is_cached('someorg/model')\n"
        "print([m for m in ('torch', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.strip() == "[]"
