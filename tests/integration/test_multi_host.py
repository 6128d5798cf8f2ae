"""Two "hosts" on one machine (README "Several hosts"): the web and each worker have their own
data dir; only the broker (reached on a second address, as from another host) and the
checkpoints dir are shared. A run trained on one worker is saved, loaded and sampled on the
other; the web tokenizes for a model only the workers loaded, and serves the run's archive; a
dead worker's run is adopted by the worker on the other "host" from the shared snapshot."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from eztinker.processes import web_argv
from eztinker_tasks import catalog
from eztinker_tasks.lifeline import die_with_parent
from tests.conftest import REPO, free_port, result_of, wait_future

# Linux answers on all of 127.0.0.0/8: a second address stands in for this host's LAN address.
REMOTE_ADDRESS = "127.0.0.2"


@dataclass
class Hosts:
    """The head (broker + web) and the worker "hosts", each with its own data dir."""

    root: Path
    base_url: str
    remote_url: str  # the broker as other hosts reach it (REMOTE_ADDRESS)
    checkpoints: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            preexec_fn=die_with_parent(signal.SIGKILL),
        )  # fmt: skip
        self.processes[name] = proc
        return proc

    def host_env(self, host: str, redis_url: str) -> dict[str, str]:
        data_dir = self.root / host / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        return {
            **os.environ,
            "EZTINKER_REDIS_URL": redis_url,
            "EZTINKER_DATA_DIR": str(data_dir),
            "CHECKPOINTS_DIR": str(self.checkpoints),
            "EZTINKER_DEVICE": "cpu",
            "EZTINKER_WORKER_HEARTBEAT_S": "0.5",
            "EZTINKER_WORKER_TTL_S": "4",
            "EZTINKER_REHOME_AFTER_S": "2",
            "EZTINKER_SNAPSHOT_INTERVAL_S": "3600",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }

    def start_worker(self, host: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "eztinker", "worker", "--name", host, "--device", "cpu"]
        return self.spawn(host, argv, self.host_env(host, self.remote_url))

    def wait_workers(self, names: set[str], timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                workers = httpx.get(self.base_url + "/health").json()["workers"]
                live = {w["name"].split("@")[0] for w in workers}  # name@hostname
                if names <= live:
                    return
            except (httpx.HTTPError, KeyError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"workers {names} did not come up; logs in {self.root}")

    def stop(self) -> None:
        for name, proc in reversed(self.processes.items()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            del name


def _broker_urls(log: Path, data_dir: Path, timeout: float = 60.0) -> tuple[str, str]:
    """The local URL (from the broker record) and the remote one the broker printed, with the
    password filled in from the password file, as an operator copies it to another host."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        printed = re.search(r"EZTINKER_REDIS_URL=(\S+)", log.read_text())
        record = data_dir / "broker" / "broker.json"
        if printed and record.exists():
            password = (data_dir / "broker" / "password").read_text().strip()
            remote = printed.group(1).replace("<password>", password)
            return json.loads(record.read_text())["url"], remote
        time.sleep(0.1)
    raise AssertionError(f"the broker printed no URL for other hosts: {log.read_text()}")


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    checkpoints = tmp_path / "shared-checkpoints"
    port = free_port()
    hosts = Hosts(tmp_path, f"http://127.0.0.1:{port}", "", checkpoints)
    head = hosts.host_env("head", "")
    del head["EZTINKER_REDIS_URL"]  # the head runs the embedded broker
    broker_env = {**head, "EZTINKER_BROKER_BIND": REMOTE_ADDRESS}
    hosts.spawn("broker", [sys.executable, "-m", "eztinker", "broker"], broker_env)
    try:
        local, hosts.remote_url = _broker_urls(tmp_path / "broker.log", tmp_path / "head" / "data")
        assert f"@{REMOTE_ADDRESS}:" in hosts.remote_url
        web_env = {**head, "EZTINKER_REDIS_URL": local, "EZTINKER_BASE_URL": hosts.base_url}
        hosts.spawn("web", web_argv("127.0.0.1", port, workers=1, threads=8), web_env)
        yield hosts
    finally:
        hosts.stop()


def _datum(seed: int, length: int = 10) -> dict[str, Any]:
    tokens = [(seed * 7 + 3 * i) % 200 + 5 for i in range(length)]
    return {"model_input": {"tokens": tokens[:-1]}, "loss_fn_inputs": {"target_tokens": tokens[1:]}}


def _local_model(model_cache_dir: Path, into: Path) -> str:
    """A base model given as a local directory (the same path on every worker host)."""
    source = catalog.model_dir("tiny-llama", model_cache_dir)
    target = into / "my-llama"
    shutil.copytree(source, target)
    return str(target)


def test_run_moves_between_hosts_sharing_only_broker_and_checkpoints(
    hosts: Hosts, model_cache: Path
) -> None:
    http = httpx.Client(base_url=hosts.base_url, timeout=60)
    base = _local_model(model_cache, hosts.root / "models-on-every-host")
    hosts.start_worker("host-a")
    hosts.wait_workers({"host-a"})

    created = http.post("/v1/runs", json={"base_model": base, "rank": 4, "seed": 5})
    run_a = created.json()["run_id"]
    assert wait_future(http, created.json()["future_id"])["status"] == "succeeded"
    for step in range(3):
        result_of(
            http, http.post(f"/v1/runs/{run_a}/forward_backward", json={"data": [_datum(step)]})
        )
        result_of(http, http.post(f"/v1/runs/{run_a}/optim_step", json={"learning_rate": 1e-2}))
    result_of(http, http.post(f"/v1/runs/{run_a}/save", json={"name": "s1"}))

    # The web has never loaded this model: it tokenizes text through the tokenizer host-a
    # published in the shared checkpoints dir (its own data dir has none).
    head_tokenizers = hosts.root / "head" / "data" / "tokenizers"
    assert not catalog.has_tokenizer(catalog.tokenizer_dir(base, head_tokenizers.parent))
    assert catalog.has_tokenizer(catalog.shared_tokenizer_dir(base, hosts.checkpoints))
    sample = {"prompt": "hello there", "max_tokens": 8, "seed": 3, "temperature": 1.0}
    on_a = result_of(http, http.post("/v1/sample", json={**sample, "run_id": run_a}))
    probe = {"data": [_datum(99)]}
    logprobs_a = result_of(http, http.post(f"/v1/runs/{run_a}/forward", json=probe))

    # host-b: its own data dir; the new run from run_a's state goes to it (fewest runs).
    hosts.start_worker("host-b")
    hosts.wait_workers({"host-a", "host-b"})
    created = http.post("/v1/runs", json={"from_state": f"{run_a}/s1"})
    assert created.json()["worker"].split("@")[0] == "host-b", created.json()
    run_b = created.json()["run_id"]
    assert wait_future(http, created.json()["future_id"])["status"] == "succeeded"
    on_b = result_of(http, http.post("/v1/sample", json={**sample, "run_id": run_b}))
    assert on_b["sequences"][0]["tokens"] == on_a["sequences"][0]["tokens"]
    logprobs_b = result_of(http, http.post(f"/v1/runs/{run_b}/forward", json=probe))
    got = logprobs_b["loss_fn_outputs"][0]["logprobs"]
    assert got == pytest.approx(logprobs_a["loss_fn_outputs"][0]["logprobs"], abs=1e-5)
    assert (hosts.root / "host-b" / "data" / "tokenizers").is_dir()  # its own copy

    # The web serves run_a's checkpoint archive from the shared dir.
    archive = http.get(f"/v1/runs/{run_a}/checkpoints/s1/archive")
    assert archive.status_code == 200, archive.text
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        assert any(name.endswith(".safetensors") for name in tar.getnames())

    # host-a dies: host-b adopts run_a from the snapshot in the shared dir; same numbers.
    hosts.processes["host-a"].kill()
    again = http.post(f"/v1/runs/{run_a}/forward", json=probe)
    body = wait_future(http, again.json()["future_id"], timeout=120)
    assert body["status"] == "succeeded", body
    got = body["result"]["loss_fn_outputs"][0]["logprobs"]
    assert got == pytest.approx(logprobs_a["loss_fn_outputs"][0]["logprobs"], abs=1e-5)
    assert http.get(f"/v1/runs/{run_a}").json()["worker"].split("@")[0] == "host-b"
