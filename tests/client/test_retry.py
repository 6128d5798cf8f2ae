"""A training op whose response is lost is retried with the same seq_id and applied once.

A small TCP proxy sits between the client and the real service. It forwards every request,
but for the first ``forward_backward`` it reads the server's answer and then closes the
client's connection without sending it: the server has queued the operation, the client saw
a dropped connection. The client resends (same body, same seq_id); the server answers with the
original future, and the run counts the batch once.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

import eztinker
from eztinker import types
from tests.client.stub import FAST_RETRY
from tests.conftest import Service


def _read_request(sock: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += sock.recv(65536)
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body


class DroppingProxy:
    """Forwards HTTP to ``upstream``; swallows the answer to the first POST ending in ``suffix``."""

    def __init__(self, upstream: str, suffix: str) -> None:
        parts = urlsplit(upstream)
        target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.suffix = suffix.encode()
        self.forwarded: list[tuple[bytes, bytes]] = []  # (request line + body, response body)
        self.dropped: list[bytes] = []
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                request = _read_request(self.request)
                if request is None:
                    return
                with socket.create_connection(target) as up:
                    up.sendall(request)
                    response = b""
                    while chunk := up.recv(65536):
                        response += chunk
                first_line = request.split(b"\r\n", 1)[0]
                method, path = first_line.split(b" ")[:2]
                body = response.partition(b"\r\n\r\n")[2]
                if method == b"POST" and path.endswith(proxy.suffix):
                    proxy.forwarded.append((request.partition(b"\r\n\r\n")[2], body))
                    if not proxy.dropped:
                        proxy.dropped.append(body)
                        return  # close without answering
                self.request.sendall(response)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def proxy(service: Service) -> Iterator[DroppingProxy]:
    p = DroppingProxy(service.base_url, "/forward_backward")
    yield p
    p.close()


def test_lost_response_is_retried_and_applied_once(service: Service, proxy: DroppingProxy) -> None:
    client = eztinker.ServiceClient(proxy.url, retry=FAST_RETRY)
    tc = client.create_lora_training_client("tiny-gpt2", rank=4, seed=0)
    tokens = [5, 17, 42, 99, 7, 300, 12, 64, 8]
    datum = types.Datum(types.ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:]})

    fb = tc.forward_backward([datum])
    out = fb.result(timeout=120)
    opt = tc.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=120)

    # The server saw the request twice with the same seq_id and answered the same future.
    assert len(proxy.forwarded) == 2
    (body1, answer1), (body2, answer2) = proxy.forwarded
    assert body1 == body2 and json.loads(body1)["seq_id"] == 1
    assert json.loads(answer1)["future_id"] == json.loads(answer2)["future_id"] == fb.future_id
    assert json.loads(proxy.dropped[0])["future_id"] == fb.future_id

    # ... and applied it once.
    info = eztinker.ServiceClient(service.base_url).get_run(tc.run_id)
    assert info.tokens_trained == len(tokens) - 1
    assert opt.metrics and opt.metrics["step"] == 1 and info.step == 1
    assert out.metrics["loss:sum"] > 0
