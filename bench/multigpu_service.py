"""The whole service on a multi-GPU host: ``eztinker server --gpus-per-worker K`` (broker, web,
one K-rank worker), driven over HTTP as a user would.

It creates a LoRA run on a large ``shaped:`` base (default a 70B shape: it fits no single GPU,
so placement must pick the K-rank worker), trains it (forward_backward + optim_step), samples it
(``/v1/sample`` and a streamed ``/openai/v1/completions``), saves its state, loads the state into
a new run and compares the two runs' logprobs, then kills one rank and times how fast the next
operation fails. Prints one table. Needs K GPUs; run on a GPU host:

    python bench/multigpu_service.py --gpus 2 --base shaped:llama-3.1-70b
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(http: httpx.Client, future_id: str, timeout: float = 600.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http.get(f"/v1/futures/{future_id}", params={"wait": 10}).json()
        if body["status"] in ("succeeded", "failed"):
            return body
    raise TimeoutError(f"future {future_id} did not finish in {timeout} s")


def _ok(http: httpx.Client, response: httpx.Response) -> tuple[dict[str, Any], float]:
    start = time.monotonic()
    assert response.status_code in (201, 202), response.text
    body = _wait(http, response.json()["future_id"])
    assert body["status"] == "succeeded", body.get("error")
    return body["result"], time.monotonic() - start


def _batch(n: int, length: int, vocab: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    data = []
    for _ in range(n):
        tokens = [rng.randrange(vocab) for _ in range(length + 1)]
        data.append(
            {
                "model_input": {"tokens": tokens[:-1]},
                "loss_fn_inputs": {"target_tokens": tokens[1:]},
            }
        )
    return {"data": data}


def _rank_pids(server: int) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "eztinker_tasks.ranks"], capture_output=True, text=True)
    del server
    return [int(p) for p in out.stdout.split()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--base", default="shaped:llama-3.1-70b")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    port = _port()
    root = Path(tempfile.mkdtemp(prefix="ezt-multigpu-"))
    env = {
        **os.environ,
        "EZTINKER_DATA_DIR": str(root / "data"),
        "CHECKPOINTS_DIR": str(root / "checkpoints"),
        "EZTINKER_OP_TIMEOUT_S": "900",
    }
    log = open(root / "server.log", "wb")  # noqa: SIM115
    argv = [sys.executable, "-m", "eztinker", "server", "--no-flower", "--port", str(port)]
    argv += ["--gpus-per-worker", str(args.gpus)]
    server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    rows: list[tuple[str, str]] = []
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        start = time.monotonic()
        workers: list[dict[str, Any]] = []
        while time.monotonic() - start < 300 and not workers:
            with contextlib.suppress(httpx.HTTPError):
                workers = http.get("/health").json().get("workers", [])
            time.sleep(1)
        assert workers, (root / "server.log").read_text()[-3000:]
        rows.append(("service ready", f"{time.monotonic() - start:.1f} s"))
        rows.append(("worker", f"{workers[0]['name']} {workers[0].get('device', '')}"))

        created = http.post("/v1/runs", json={"base_model": args.base, "rank": 32, "seed": 1})
        run, took = _ok(http, created)
        run_id = run["run_id"]
        where = created.json()["worker"]
        rows.append((f"create run on {args.base}", f"{took:.1f} s on {where}"))
        info = http.get("/v1/models").json()
        vocab = next(
            (m["vocab_size"] for m in info.get("models", []) if m["name"] == args.base), 32000
        )
        batch = _batch(args.sequences, args.length, vocab, seed=0)
        times = []
        for step in range(args.steps):
            fb = http.post(f"/v1/runs/{run_id}/forward_backward", json=batch)
            opt = http.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 1e-4})
            t0 = time.monotonic()
            result, _ = _ok(http, fb)
            _ok(http, opt)
            times.append(time.monotonic() - t0)
            del step
        step_s = sorted(times)[len(times) // 2]
        tokens = args.sequences * args.length
        rows.append(
            (
                f"train step ({args.sequences} x {args.length})",
                f"{step_s:.2f} s median of {args.steps}, {tokens / step_s:,.0f} tokens/s, "
                f"loss:sum {result['metrics']['loss:sum']:.1f}",
            )
        )
        prompt = {"prompt_tokens": batch["data"][0]["model_input"]["tokens"][:64]}
        sample = http.post(
            "/v1/sample", json={**prompt, "run_id": run_id, "num_samples": 4, "max_tokens": 32}
        )
        _, took = _ok(http, sample)
        rows.append(("sample 4 x 32 tokens", f"{took:.1f} s, {128 / took:.1f} tokens/s"))
        t0 = time.monotonic()
        first = None
        chunks = 0
        body = {"model": f"run:{run_id}", "prompt": "Hello", "max_tokens": 24, "stream": True}
        with http.stream("POST", "/openai/v1/completions", json=body) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    first = first or time.monotonic() - t0
        rows.append(
            (
                "openai stream, 24 tokens",
                f"first token {first or 0:.2f} s, {chunks} chunks, {time.monotonic() - t0:.1f} s",
            )
        )
        saved, took = _ok(http, http.post(f"/v1/runs/{run_id}/save", json={"name": "s1"}))
        rows.append(("save state", f"{took:.1f} s"))
        loaded = http.post("/v1/runs", json={"from_state": saved["path"]})
        run2 = loaded.json()["run_id"]
        _, took = _ok(http, loaded)
        rows.append(("new run from the state", f"{took:.1f} s"))
        probe = _batch(1, 128, vocab, seed=9)
        a, _ = _ok(http, http.post(f"/v1/runs/{run_id}/forward", json=probe))
        b, _ = _ok(http, http.post(f"/v1/runs/{run2}/forward", json=probe))
        la, lb = a["loss_fn_outputs"][0]["logprobs"], b["loss_fn_outputs"][0]["logprobs"]
        diff = max(abs(x - y) for x, y in zip(la, lb, strict=True))
        rows.append(("loaded run vs original, logprobs", f"max abs diff {diff:.2e}"))
        assert diff < 1e-2, diff

        pids = _rank_pids(server.pid)
        rows.append(("follower rank processes", str(pids)))
        if pids:
            pending = http.post(f"/v1/runs/{run_id}/forward_backward", json=batch)
            time.sleep(0.5)
            os.kill(pids[0], signal.SIGKILL)
            t0 = time.monotonic()
            ended = _wait(http, pending.json()["future_id"], timeout=120)
            rows.append(
                (
                    "kill a rank mid-pass",
                    f"future {ended['status']} {time.monotonic() - t0:.2f} s after the kill: "
                    f"{(ended.get('error') or {}).get('message', '')[:90]}",
                )
            )
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        width = max(len(k) for k, _ in rows) if rows else 10
        print(f"\n{'step':{width}}  result")
        for key, value in rows:
            print(f"{key:{width}}  {value}")
        print(f"(server log: {root / 'server.log'})")
        log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
