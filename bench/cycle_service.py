"""The clock cycle through the whole service: 16 SDK clients, one run each, on one worker.

Starts the real stack (``eztinker server --no-flower``: embedded broker, gunicorn, one worker on
the GPU) in a temporary data dir and creates 16 LoRA runs (r=32 on attention + MLP) on a
random-weight base of a real shape (``shaped:llama-3.2-1b`` by default). One cycle = every run
does one 1 x 128 ``forward_backward`` + ``optim_step``. Measured side by side:

- one client driving the 16 runs one after another (each call waited for): what a cycle costs
  when nothing is shared;
- 16 SDK clients, one thread each, every client pipelining its forward_backward + optim_step
  and waiting for both; the worker runs the calls of all runs that wait together in one pass
  (``eztinker_tasks.cycle``). Reported: seconds per cycle and how many runs the passes held.

    python bench/cycle_service.py                      # GPU
    uv run python bench/cycle_service.py --device cpu --model tiny-llama --runs 4 --cycles 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from service import start_server, wait_healthy  # bench/service.py

import eztinker
from eztinker import types


def datum(i: int, step: int, length: int, vocab: int) -> types.Datum:
    tokens = [(7919 * (i + 1) + 104729 * step + 31 * k) % vocab for k in range(length + 1)]
    return types.Datum(types.ModelInput.from_ints(tokens[:-1]), {"target_tokens": tokens[1:]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="shaped:llama-3.2-1b")
    parser.add_argument("--runs", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--cycles", type=int, default=8)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="eztinker-cycle-"))
    server, base, log_path = start_server(tmp, args.device)
    try:
        deadline = time.monotonic() + 240
        while True:  # up, or its log shown at once if the server stops or takes too long
            try:
                wait_healthy(base, 5, str(log_path))
                break
            except SystemExit:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise
        sdk = eztinker.ServiceClient(base_url=base)
        started = time.perf_counter()
        clients = [
            sdk.create_lora_training_client(args.model, rank=32, seed=i, train_unembed=False)
            for i in range(args.runs)
        ]
        print(f"# {args.runs} runs on {args.model} ready in {time.perf_counter() - started:.1f} s")
        vocab = 2048 if args.model.startswith("tiny") else 128000
        adam = types.AdamParams(learning_rate=1e-5)

        def one(i: int, step: int) -> types.ForwardBackwardOutput:
            fb = clients[i].forward_backward([datum(i, step, args.tokens, vocab)], "cross_entropy")
            opt = clients[i].optim_step(adam)
            out = fb.result()
            opt.result()
            return out

        step = 0

        def sequential() -> None:
            nonlocal step
            for i in range(args.runs):
                one(i, step)
            step += 1

        runs_per_pass: list[int] = []

        def together() -> None:
            nonlocal step
            outs: list[types.ForwardBackwardOutput | None] = [None] * args.runs
            threads = [
                threading.Thread(target=lambda i=i: outs.__setitem__(i, one(i, step)))
                for i in range(args.runs)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            runs_per_pass.extend((o.batch or {}).get("runs", 1) for o in outs if o is not None)
            step += 1

        rows = {}
        for label, fn in (
            ("one client, the runs one after another", sequential),
            (f"{args.runs} SDK clients at once", together),
        ):
            fn()  # warm-up
            runs_per_pass.clear()
            times = []
            for _ in range(args.cycles):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            rows[label] = statistics.median(times)
            extra = ""
            if runs_per_pass:
                extra = (
                    f" | runs per pass: median {statistics.median(runs_per_pass):.0f}, "
                    f"max {max(runs_per_pass)}"
                )
            rate = args.runs * args.tokens / rows[label]
            print(
                f"| {label} | {rows[label] * 1e3:.0f} ms per cycle | {rate:,.0f} tokens/s{extra} |"
            )
    except BaseException:
        tail = log_path.read_text(errors="replace")[-3000:]
        print(f"# the server's log ends with:\n{tail}", file=sys.stderr)
        raise
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
