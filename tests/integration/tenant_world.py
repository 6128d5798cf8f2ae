"""Two tenants' objects on a real stack with keys, for the tenant tests.

``build_world`` starts a private stack (embedded broker, one CPU worker, web over HTTP) whose
``EZTINKER_API_KEYS`` names alice, bob, an admin and a bare (default-tenant) key, and whose
keys file names carol and dave; then alice and bob each make a run, train it, save it and keep
a future. ``World`` sends requests as any of them by name.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from eztinker_tasks import catalog
from tests.conftest import Service, start_service, wait_future

KEYS = {
    "alice": "ka",
    "bob": "kb",
    "admin": "kroot",
    "default": "kold",
    "carol": "kc",
    "dave": "kd",
}
TOKENS = [5, 17, 42, 99, 7, 300, 12, 64]
FB = {"input_ids": TOKENS, "target_ids": TOKENS}


@dataclass
class World:
    svc: Service
    clients: dict[str, httpx.Client] = field(default_factory=dict)
    a_run: str = ""  # alice's run, on alice's own local copy of tiny-gpt2 (a_model)
    a_model: str = ""
    a_future: str = ""  # a finished forward_backward of a_run
    a_state: str = ""  # "<a_run>/s1", a state checkpoint
    a_sampler: str = ""  # "<a_run>/smp", a sampler checkpoint
    b_run: str = ""
    b_future: str = ""
    b_state: str = ""

    def client(self, who: str) -> httpx.Client:
        if who not in self.clients:
            headers = {"Authorization": f"Bearer {KEYS[who]}"} if who in KEYS else {}
            self.clients[who] = httpx.Client(
                base_url=self.svc.base_url, timeout=60, headers=headers
            )
        return self.clients[who]

    def get(self, who: str, path: str, **kw: Any) -> httpx.Response:
        return self.client(who).get(path, **kw)

    def post(self, who: str, path: str, body: Any) -> httpx.Response:
        return self.client(who).post(path, json=body)

    def delete(self, who: str, path: str) -> httpx.Response:
        return self.client(who).delete(path)

    def done(self, who: str, response: httpx.Response) -> dict[str, Any]:
        """Wait, as ``who``, for the future a 201/202 names; it must succeed."""
        assert response.status_code in (201, 202), response.text
        body = wait_future(self.client(who), response.json()["future_id"])
        assert body["status"] == "succeeded", body["error"]
        return body["result"]

    def run_state(self, who: str, run_id: str) -> tuple[Any, ...]:
        """What a write could change: the run as its owner sees it, and its files on disk."""
        run = self.get(who, f"/v1/runs/{run_id}")
        assert run.status_code == 200, run.text
        body = run.json()
        on_disk = sorted(p.name for p in (self.svc.checkpoints_dir / run_id).iterdir())
        names = sorted(c["name"] for c in body["checkpoints"])
        keep = ("status", "step", "tokens_trained", "last_seq_id", "last_state", "last_loss")
        return (*(body[k] for k in keep), names, on_disk)

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.svc.stop()


def start_tenant_stack(tmp: Path, model_cache: Path, extra_env: dict[str, str]) -> Service:
    keys_file = tmp / "keys.txt"
    keys_file.write_text("# tenants of the keys file\nkc carol\nkd dave\n")
    env = {
        "EZTINKER_API_KEYS": "ka:alice, kb:bob, kroot:admin, kold",
        "EZTINKER_API_KEYS_FILE": str(keys_file),
        "EZTINKER_MODEL_DIRS": str(tmp),  # tenants may name model directories under it
        **extra_env,
    }
    return start_service(tmp, model_cache, extra_env=env)


def build_world(tmp: Path, model_cache: Path, extra_env: dict[str, str]) -> World:
    w = World(start_tenant_stack(tmp, model_cache, extra_env))
    try:
        local = tmp / "alice-model"
        shutil.copytree(catalog.model_dir("tiny-gpt2", w.svc.data_dir), local)
        w.a_model = str(local)
        created = w.post("alice", "/v1/runs", {"base_model": w.a_model, "rank": 4, "seed": 1})
        w.a_run = created.json()["run_id"]
        w.done("alice", created)
        fb = w.post("alice", f"/v1/runs/{w.a_run}/forward_backward", FB)
        w.a_future = fb.json()["future_id"]
        w.done("alice", fb)
        w.done("alice", w.post("alice", f"/v1/runs/{w.a_run}/optim_step", {"learning_rate": 0.01}))
        w.a_state = w.done("alice", w.post("alice", f"/v1/runs/{w.a_run}/save", {"name": "s1"}))[
            "path"
        ]
        smp = w.post("alice", f"/v1/runs/{w.a_run}/save", {"name": "smp", "kind": "sampler"})
        w.a_sampler = w.done("alice", smp)["path"]

        created = w.post("bob", "/v1/runs", {"base_model": "tiny-gpt2", "rank": 4, "seed": 2})
        w.b_run = created.json()["run_id"]
        w.done("bob", created)
        fb = w.post("bob", f"/v1/runs/{w.b_run}/forward_backward", FB)
        w.b_future = fb.json()["future_id"]
        w.done("bob", fb)
        w.b_state = w.done("bob", w.post("bob", f"/v1/runs/{w.b_run}/save", {"name": "sB"}))["path"]
    except BaseException:
        w.close()
        raise
    return w


def elapsed(fn: Any) -> tuple[Any, float]:
    started = time.monotonic()
    out = fn()
    return out, time.monotonic() - started
