"""Automatic recovery, measured: a SIGKILLed worker or a restarted server costs seconds, not work.

Starts the real stack (``eztinker server --no-flower --workers 2``) in a temporary data dir and,
on tiny-llama (CPU by default), for each trial:

1. trains a reference run: 60 pipelined forward_backward + optim_step (the SDK, one client);
2. trains the same run (same seed and data) and, at a random step, SIGKILLs the worker that
   holds it while that step's forward_backward (a long one, also in the reference) runs.

Reported per trial: the step, how long that step takes without a kill (in the reference run),
seconds from the kill to that step's results (the supervisor restarts the worker, which
recovers the run from its snapshot, replays the logged ops and runs the killed step again),
futures that did not resolve within 180 s (hung), and the largest difference between the two
final adapters. Then the whole server is stopped (Ctrl-C) and started again with a run 20
steps in: seconds until the run is ``ready`` again, and its step.

    uv run python bench/recovery.py [--trials 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from safetensors.torch import load_file
from service import start_server, wait_healthy  # bench/service.py

import eztinker
from eztinker import types

MODEL = "tiny-llama"
ADAM = types.AdamParams(learning_rate=2e-3)


def datum(step: int, length: int = 12) -> types.Datum:
    rng = random.Random(step)
    tokens = [rng.randrange(5, 2000) for _ in range(length)]
    return types.Datum(types.ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:]})


@dataclass
class Outcome:
    run_id: str
    path: str
    resumed_s: float | None  # from the kill to the heavy step's results
    heavy_s: float  # the heavy step, from its submit to its results
    hung: int


def train(base: str, steps: int, heavy_at: int, kill: bool) -> Outcome:
    hung = 0
    resumed = None
    heavy = 0.0
    with eztinker.ServiceClient(base_url=base) as service:
        client = service.create_lora_training_client(MODEL, rank=4, seed=11)
        run_id = client.model_id
        for step in range(steps):
            batch = [datum(step + 1000 * i, 256) for i in range(48)] if step == heavy_at else []
            submitted = time.monotonic()
            fb = client.forward_backward(batch or [datum(step)], "cross_entropy")
            opt = client.optim_step(ADAM)
            killed_at = None
            if kill and step == heavy_at:
                name = httpx.get(f"{base}/v1/runs/{run_id}").json()["worker"]
                pid = next(
                    w["pid"] for w in httpx.get(f"{base}/health").json()["workers"]
                    if w["name"] == name
                )  # fmt: skip
                while httpx.get(f"{base}/v1/futures/{fb.future_id}").json()["status"] == "pending":
                    time.sleep(0.01)
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
            for future in (fb, opt):
                try:
                    future.result(timeout=180)
                except TimeoutError:
                    hung += 1
            if killed_at is not None:
                resumed = time.monotonic() - killed_at
            if step == heavy_at:
                heavy = time.monotonic() - submitted
        path = client.save_state("final").result(timeout=180).path
    return Outcome(run_id, path, resumed, heavy, hung)


def max_diff(checkpoints: Path, a: str, b: str) -> float:
    ta = load_file(str(checkpoints / a / "adapter_model.safetensors"))
    tb = load_file(str(checkpoints / b / "adapter_model.safetensors"))
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def restart(
    tmp: Path, base: str, server: subprocess.Popen[bytes], device: str
) -> tuple[float, int, subprocess.Popen[bytes]]:
    """A run 20 steps in; Ctrl-C the server, start it again: (s until ready, step, server)."""
    with eztinker.ServiceClient(base_url=base) as service:
        client = service.create_lora_training_client(MODEL, rank=4, seed=11)
        for step in range(20):
            client.forward_backward([datum(step)], "cross_entropy")
            client.optim_step(ADAM).result(timeout=180)
        run_id = client.model_id
    server.send_signal(signal.SIGINT)
    server.wait(60)
    port = int(base.rsplit(":", 1)[1])
    started = time.monotonic()
    server, base, log_path = start_server(tmp, device, "--workers", "2", port=port)
    wait_healthy(base, 240, str(log_path))
    while (run := httpx.get(f"{base}/v1/runs/{run_id}").json())["status"] != "ready":
        if time.monotonic() - started > 240:
            raise SystemExit(f"run not back after 240 s: {run}")
        time.sleep(0.1)
    return time.monotonic() - started, int(run["step"]), server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="eztinker-recovery-"))
    server, base, log_path = start_server(tmp, args.device, "--workers", "2")
    rng = random.Random(args.seed)
    rows = []
    try:
        wait_healthy(base, 240, str(log_path))
        for _ in range(args.trials):
            at = rng.randrange(5, 55)
            reference = train(base, 60, at, kill=False)
            faulted = train(base, 60, at, kill=True)
            diff = max_diff(tmp / "ckpt", reference.path, faulted.path)
            resumed = faulted.resumed_s or float("nan")
            rows.append((at, reference.heavy_s, resumed, faulted.hung, diff))
        back_s, step, server = restart(tmp, base, server, args.device)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    print(f"\nSIGKILL of the run's worker during a 60-step SDK loop ({MODEL}, {args.device}, "
          "eztinker server --workers 2)")  # fmt: skip
    print(f"{'kill at step':>12} {'that step, no kill (s)':>23} {'kill -> its results (s)':>24} "
          f"{'hung futures':>13} {'max |adapter - ref|':>20}")  # fmt: skip
    for at, heavy, resumed, hung, diff in rows:
        print(f"{at:>12} {heavy:>23.1f} {resumed:>24.1f} {hung:>13} {diff:>20.2e}")
    print(f"\nserver stopped (Ctrl-C) and started again, a run 20 steps in: ready again "
          f"{back_s:.1f} s after the start command, at step {step}")  # fmt: skip


if __name__ == "__main__":
    main()
