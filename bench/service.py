"""Service overhead: one small op through HTTP + Celery versus the engine in-process (CPU).

Starts the real stack (``eztinker server --no-flower``: embedded broker, gunicorn, one CPU
worker) in a temporary data dir, then measures on tiny-gpt2:

1. p50/p99 latency of one small ``forward`` (1 datum of 16 tokens) called in-process;
2. p50/p99 round trip of the same op over HTTP: POST, then long-poll the future (with the
   SDK's HTTP layer, ``eztinker.transport.Transport``), and through the SDK proper
   (``TrainingClient.forward(...).result()``);
3. throughput of N pipelined ops (all submitted, then all awaited), over HTTP from 4 client
   threads (which then collect the results 100 at a time from ``/v1/futures/batch``), and
   through one SDK ``TrainingClient`` (one long-poll per future).

The three latencies are measured interleaved, in rounds of 20 calls each, so that slow phases
of a shared machine hit the engine alone and the service alike.

    uv run python bench/service.py [--ops 1000] [--latency-samples 200]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eztinker_tasks.lifeline import die_with_parent

if TYPE_CHECKING:
    from eztinker.transport import Transport

TOKENS = list(range(10, 27))
DATUM = {
    "model_input": {"tokens": TOKENS[:-1]},
    "loss_fn_inputs": {"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)},
}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def in_process_op(data_dir: Path, device: str) -> Callable[[], object]:
    """The same op called on an engine in this process (builds the tiny model first)."""
    from eztinker_tasks.engine import Engine, EngineConfig
    from eztinker_tasks.types import Datum, LoraSpec

    engine = Engine(EngineConfig(data_dir=data_dir, checkpoints_dir=data_dir / "c", device=device))
    engine.create_run("bench", "tiny-gpt2", LoraSpec(rank=8, seed=0))
    datum = Datum(tuple(TOKENS[:-1]), {"target_tokens": TOKENS[1:], "weights": [1.0] * 16})
    return lambda: engine.forward("bench", [datum])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    tmp: Path, device: str, *args: str, port: int | None = None, **env_vars: str
) -> tuple[subprocess.Popen[bytes], str, Path]:
    """``eztinker server --no-flower [args]`` in a private data dir under ``tmp``, on a free
    port (or ``port``), with ``env_vars`` added to its environment.

    Returns the process (it dies with this one), its base URL and its log file.
    """
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if k != "EZTINKER_REDIS_URL"} | {
        "EZTINKER_DATA_DIR": str(tmp / "data"),
        "CHECKPOINTS_DIR": str(tmp / "ckpt"),
        "EZTINKER_FLOWER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        **env_vars,
    }
    log_path = tmp / "server.log"
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "eztinker", "server", "--no-flower", "--port", str(port),
             "--host", "127.0.0.1", "--device", device, *args],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent(),  # a killed benchmark leaves no server behind
        )  # fmt: skip
    return server, f"http://127.0.0.1:{port}", log_path


def wait_healthy(base: str, timeout_s: float, log_hint: str) -> None:
    """Wait until ``base``/health answers 200 (the stack is up), else exit naming the log."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"server did not start; see {log_hint}")
        time.sleep(0.3)


def http_roundtrip(transport: Transport, run_id: str) -> None:
    """One small ``forward`` over HTTP: POST it, then long-poll its future."""
    fut = transport.request("POST", f"/v1/runs/{run_id}/forward", json={"data": [DATUM]})
    body = transport.request("GET", f"/v1/futures/{fut['future_id']}", params={"wait": 30})
    assert body["status"] == "succeeded", body


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (engine and worker)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="eztinker-bench-"))
    os.environ["OMP_NUM_THREADS"] = "1"
    local_op = in_process_op(tmp / "data", args.device)
    server, base, _ = start_server(tmp, args.device)
    try:
        wait_healthy(base, 120, str(tmp / "server.log"))
        from eztinker import ServiceClient, types
        from eztinker.transport import Transport

        transport = Transport(base)
        service = ServiceClient(base_url=base)
        run_id = service.create_lora_training_client("tiny-gpt2", rank=8, seed=0).run_id
        training = service.create_lora_training_client("tiny-gpt2", rank=8, seed=0)
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(TOKENS[:-1]),
            loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * 16},
        )

        def remote_roundtrip() -> None:
            http_roundtrip(transport, run_id)

        def sdk_roundtrip() -> None:
            training.forward([datum]).result()

        def timed(fn: Callable[[], object]) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        for _ in range(10):
            local_op()
            remote_roundtrip()
            sdk_roundtrip()
        local: list[float] = []
        remote: list[float] = []
        sdk: list[float] = []
        for _ in range(0, args.latency_samples, 20):  # interleaved in rounds of 20
            local += [timed(local_op) for _ in range(20)]
            remote += [timed(remote_roundtrip) for _ in range(20)]
            sdk += [timed(sdk_roundtrip) for _ in range(20)]

        # Pipelined: submit every op first (4 client threads), then wait for all of them.
        t0 = time.perf_counter()

        def submit(_: int) -> str:
            body = transport.request("POST", f"/v1/runs/{run_id}/forward", json={"data": [DATUM]})
            return body["future_id"]

        def collect(batch: list[str]) -> None:
            body = transport.request(
                "POST", "/v1/futures/batch", json={"future_ids": batch, "wait": 30},
                idempotent=True, timeout=90,
            )  # fmt: skip
            assert all(f["status"] == "succeeded" for f in body["futures"]), body

        with ThreadPoolExecutor(4) as pool:
            ids = list(pool.map(submit, range(args.ops)))
            t_submit = time.perf_counter() - t0
            list(pool.map(collect, [ids[i : i + 100] for i in range(0, len(ids), 100)]))
        t_all = time.perf_counter() - t0

        # The same through the Python SDK: one TrainingClient pipelining its calls.
        t0 = time.perf_counter()
        sdk_futures = [training.forward([datum]) for _ in range(args.ops)]
        for fut in sdk_futures:
            fut.result(timeout=60)
        t_sdk = time.perf_counter() - t0
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)

    ms = 1000.0
    p50_l, p99_l = pct(local, 0.5) * ms, pct(local, 0.99) * ms
    rows = [("HTTP + Celery round trip", remote), ("SDK forward().result()", sdk)]
    print()
    print(f"EZTinker service overhead ({args.device}, tiny-gpt2, forward of 1 x 16 tokens)")
    print(f"{'measure':<44}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'engine in-process':<44}{p50_l:>10.2f}{p99_l:>10.2f}")
    for name, times in rows:
        print(f"{name:<44}{pct(times, 0.5) * ms:>10.2f}{pct(times, 0.99) * ms:>10.2f}")
    for name, times in rows:
        label = f"overhead: {name.split(' ')[0]} - in-process"
        p50, p99 = pct(times, 0.5) * ms - p50_l, pct(times, 0.99) * ms - p99_l
        print(f"{label:<44}{p50:>10.2f}{p99:>10.2f}")
    print()
    print(f"{'pipelined ops':<44}{args.ops:>10d}")
    print(f"{'submit time (s)':<44}{t_submit:>10.2f}")
    print(f"{'submit + complete time (s)':<44}{t_all:>10.2f}")
    print(f"{'throughput, HTTP, 4 threads (ops/s)':<44}{args.ops / t_all:>10.1f}")
    print(f"{'throughput, SDK TrainingClient (ops/s)':<44}{args.ops / t_sdk:>10.1f}")
    print(f"mean in-process op: {statistics.mean(local) * ms:.2f} ms")


if __name__ == "__main__":
    main()
