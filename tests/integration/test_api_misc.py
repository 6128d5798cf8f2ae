"""Health, auth, settings, checkpoints archive/delete, sampling from a saved checkpoint."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest

from config import Settings, SettingsError
from eztinker.processes import web_argv
from eztinker_web import create_app
from tests.conftest import Service, free_port, result_of, start_service

TOKENS = [5, 17, 42, 99, 7, 300, 12, 64]


def test_health_and_run_creation_answer_503_without_broker(tmp_path: Path) -> None:
    dead = f"redis://:pw@127.0.0.1:{free_port()}/0"
    app = create_app(Settings(redis_url=dead, data_dir=tmp_path))
    client = app.test_client()
    r = client.get("/health")
    assert r.status_code == 503
    assert r.get_json()["status"] == "down"
    r = client.post("/v1/runs", json={})
    assert r.status_code == 503
    assert r.get_json()["category"] == "server"


def test_no_live_worker_means_503_with_a_hint(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> None:
    svc = start_service(tmp_path_factory.mktemp("noworker"), model_cache, workers=0)
    try:
        with svc.http as http:
            health = http.get("/health")
            assert health.status_code == 503
            assert "eztinker worker" in health.json()["message"]
            r = http.post("/v1/runs", json={})
            assert r.status_code == 503
            assert "eztinker worker" in r.json()["message"]
    finally:
        svc.stop()


def test_api_keys_guard_v1_but_not_health(service: Service, tmp_path: Path) -> None:
    settings = Settings.from_env(
        {"EZTINKER_REDIS_URL": service.redis_url, "EZTINKER_API_KEYS": "k1, k2"},
        data_dir=service.data_dir,
    )
    client = create_app(settings).test_client()
    assert client.get("/health").status_code == 200
    denied = client.get("/v1/runs")
    assert denied.status_code == 401
    assert denied.get_json()["code"] == "unauthorized"
    assert client.get("/v1/runs", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/runs", headers={"Authorization": "Bearer k2"}).status_code == 200
    assert client.get("/v1/runs", headers={"X-API-Key": "k1"}).status_code == 200


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"EZTINKER_PORT": "eighty"}, "EZTINKER_PORT"),
        ({"EZTINKER_PORT": "70000"}, "EZTINKER_PORT"),
        ({"EZTINKER_REDIS_URL": "http://x"}, "EZTINKER_REDIS_URL"),
        ({"EZTINKER_DEVICE": "tpu"}, "EZTINKER_DEVICE"),
        ({"EZTINKER_OP_TIMEOUT_S": "-1"}, "EZTINKER_OP_TIMEOUT_S"),
        ({"EZTINKER_BASE_URL": "localhost"}, "EZTINKER_BASE_URL"),
        ({"EZTINKER_DEFAULT_MODEL": "../../bad model"}, "EZTINKER_DEFAULT_MODEL"),
        ({"EZTINKER_HOST": "bad host!"}, "EZTINKER_HOST"),
        ({"EZTINKER_WEB_WORKERS": "-1"}, "EZTINKER_WEB_WORKERS"),
        ({"EZTINKER_ACCESS_LOG": "sometimes"}, "EZTINKER_ACCESS_LOG"),
        ({"EZTINKER_BROKER_BIND": "10.0.0.1,lan-host"}, "EZTINKER_BROKER_BIND"),
    ],
)
def test_invalid_settings_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(env)


def test_settings_defaults_match_the_seed() -> None:
    s = Settings.from_env({})
    assert s.redis_url is None
    assert s.checkpoints_dir == Path("checkpoints")
    assert s.base_url == "http://localhost:8000"
    assert (s.host, s.port) == ("localhost", 8000)
    assert s.default_model == "tiny-gpt2"
    assert Settings.from_env({"CHECKPOINTS_DIR": "/x"}).checkpoints_dir == Path("/x")
    assert Settings.from_env({"EZTINKER_DEFAULT_MODEL": "Qwen/Qwen2.5-0.5B"}).default_model == (
        "Qwen/Qwen2.5-0.5B"
    )
    assert 2 <= s.web_processes() <= 4
    assert Settings.from_env({"EZTINKER_WEB_WORKERS": "3"}).web_processes() == 3
    for host in ("0.0.0.0", "::", "[::1]", "my-host.local"):
        assert Settings.from_env({"EZTINKER_HOST": host}).host == host
    assert s.access_log is False
    assert "--access-logfile" not in web_argv("localhost", 8000, 2)
    assert Settings.from_env({"EZTINKER_ACCESS_LOG": "1"}).access_log is True
    assert "--access-logfile" in web_argv("localhost", 8000, 2, access_log=True)


def test_checkpoint_archive_sampler_checkpoint_and_delete(
    service: Service, http: httpx.Client
) -> None:
    created = http.post("/v1/runs", json={"base_model": "tiny-llama", "rank": 4, "seed": 5})
    run_id = created.json()["run_id"]
    result_of(http, created)
    fb = {"input_ids": TOKENS, "target_ids": TOKENS}
    for _ in range(3):
        http.post(f"/v1/runs/{run_id}/forward_backward", json=fb)
        http.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 1e-2})
    saved = result_of(
        http, http.post(f"/v1/runs/{run_id}/save", json={"name": "for-sampler", "kind": "sampler"})
    )
    assert saved["kind"] == "sampler" and saved["step"] == 3

    listed = http.get(f"/v1/runs/{run_id}/checkpoints").json()["checkpoints"]
    assert [c["name"] for c in listed] == ["for-sampler"]

    archive = http.get(f"/v1/runs/{run_id}/checkpoints/for-sampler/archive")
    assert archive.status_code == 200
    assert archive.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        names = set(tar.getnames())
    assert "for-sampler/adapter_model.safetensors" in names
    assert "for-sampler/adapter_config.json" in names

    # Sampling a saved checkpoint (shared queue) equals sampling the live run.
    probe = {"prompt_tokens": TOKENS[:3], "max_tokens": 6, "temperature": 0.0}
    live = result_of(http, http.post("/v1/sample", json={**probe, "run_id": run_id}))
    ckpt = result_of(http, http.post("/v1/sample", json={**probe, "checkpoint": saved["path"]}))
    assert ckpt["sequences"][0]["tokens"] == live["sequences"][0]["tokens"]
    lp_live = result_of(
        http, http.post("/v1/compute_logprobs", json={"tokens": TOKENS, "run_id": run_id})
    )
    lp_ckpt = result_of(
        http,
        http.post("/v1/compute_logprobs", json={"tokens": TOKENS, "model_path": saved["path"]}),
    )
    assert lp_live["logprobs"][0] is None
    assert lp_ckpt["logprobs"][1:] == pytest.approx(lp_live["logprobs"][1:], abs=1e-5)

    gone = http.delete(f"/v1/runs/{run_id}/checkpoints/for-sampler")
    assert gone.status_code == 200
    assert not (service.checkpoints_dir / run_id / "for-sampler").exists()
    assert http.get(f"/v1/runs/{run_id}/checkpoints/for-sampler").status_code == 404
    info = http.get(f"/v1/runs/{run_id}").json()
    assert info["last_seq_id"] == 7  # 3 x (fb + step) + save


def test_batch_futures_long_poll_until_all_done(http: httpx.Client) -> None:
    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4, "seed": 2})
    run_id = created.json()["run_id"]
    result_of(http, created)
    ids = [
        http.post(
            f"/v1/runs/{run_id}/forward", json={"input_ids": TOKENS, "target_ids": TOKENS}
        ).json()["future_id"]
        for _ in range(5)
    ]
    batch = http.post("/v1/futures/batch", json={"future_ids": ids, "wait": 30})
    assert batch.status_code == 200, batch.text
    bodies = batch.json()["futures"]
    assert [b["future_id"] for b in bodies] == ids
    assert all(b["status"] == "succeeded" for b in bodies)
    single = http.get(f"/v1/futures/{ids[3]}").json()
    assert single["result"] == bodies[3]["result"]
    missing = http.post("/v1/futures/batch", json={"future_ids": [ids[0], "fut_nope"]})
    assert missing.status_code == 404
    assert "fut_nope" in missing.json()["message"]
    assert http.post("/v1/futures/batch", json={"future_ids": []}).status_code == 422


def test_web_process_never_imports_torch(service: Service) -> None:
    code = """
import sys
from config import Settings
from eztinker_web import create_app
app = create_app(Settings.from_env())
c = app.test_client()
runs = c.get("/v1/runs").get_json()["runs"]
assert c.post("/v1/tokenize", json={"text": "hi"}).status_code == 200
assert c.post("/v1/sample", json={"prompt": "hi", "max_tokens": 1}).status_code == 202
heavy = [m for m in ("torch", "transformers", "peft") if m in sys.modules]
print("HEAVY", heavy)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], env=service.env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stdout, out.stdout


def test_deleting_the_last_saved_state_points_the_run_at_the_one_before(
    http: httpx.Client,
) -> None:
    """A run's ``last_state`` (what `eztinker load RUN` loads, and what the lost-run hints name)
    never names a deleted checkpoint: deleting it names the newest state left, or none."""
    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 2})
    run_id = created.json()["run_id"]
    result_of(http, created)
    fb = {"input_ids": TOKENS, "target_ids": TOKENS}
    for name in ("first", "second"):
        http.post(f"/v1/runs/{run_id}/forward_backward", json=fb)
        http.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 1e-2})
        result_of(http, http.post(f"/v1/runs/{run_id}/save", json={"name": name}))
    sampler = {"name": "weights", "kind": "sampler"}
    result_of(http, http.post(f"/v1/runs/{run_id}/save", json=sampler))
    assert http.get(f"/v1/runs/{run_id}").json()["last_state"] == f"{run_id}/second"
    assert http.delete(f"/v1/runs/{run_id}/checkpoints/weights").status_code == 200
    assert http.get(f"/v1/runs/{run_id}").json()["last_state"] == f"{run_id}/second"
    assert http.delete(f"/v1/runs/{run_id}/checkpoints/second").status_code == 200
    assert http.get(f"/v1/runs/{run_id}").json()["last_state"] == f"{run_id}/first"
    # deleting an older one leaves it; the last one gone, there is none
    result_of(http, http.post(f"/v1/runs/{run_id}/save", json={"name": "third"}))
    assert http.delete(f"/v1/runs/{run_id}/checkpoints/first").status_code == 200
    assert http.get(f"/v1/runs/{run_id}").json()["last_state"] == f"{run_id}/third"
    assert http.delete(f"/v1/runs/{run_id}/checkpoints/third").status_code == 200
    assert http.get(f"/v1/runs/{run_id}").json()["last_state"] is None
