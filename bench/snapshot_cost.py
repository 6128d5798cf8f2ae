"""What an automatic snapshot costs the GPU: ``capture_state`` (the only part on the operation
thread: the device-to-host copy of adapter + AdamW state) against one training step, and the
background write that follows, on random-weight bases of real shapes, LoRA r=32 on every
attention and MLP linear (bf16 on CUDA).

    python bench/snapshot_cost.py                                   # GPU: 1B and 8B shapes
    uv run python bench/snapshot_cost.py --device cpu --small       # local smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from engine import ADAM, LORA, bench_engine, sync  # bench/engine.py

from eztinker_tasks.types import Datum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny-llama stands in")
    parser.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    parser.add_argument("--tokens", type=int, default=8 * 1024)
    args = parser.parse_args()
    device = torch.device(args.device)
    workdir = Path(tempfile.mkdtemp(prefix="eztinker-snapcost-"))
    engine, _ = bench_engine(device, workdir)
    shapes = ["tiny-llama"] if args.small else args.shapes
    print(f"{'base':>14} {'adapter+optim MiB':>18} {'step ms':>9} {'capture ms':>11} "
          f"{'capture/step':>13} {'write ms (background)':>22}")  # fmt: skip
    for i, shape in enumerate(shapes):
        name = shape if args.small else f"shaped:{shape}"
        run_id = f"r{i}"
        engine.create_run(run_id, name, LORA)
        vocab = engine.model_info(name).vocab_size
        gen = torch.Generator().manual_seed(0)
        length = 1024 if not args.small else 128
        rows = torch.randint(0, vocab, (max(1, args.tokens // length), length + 1), generator=gen)
        data = [Datum(tuple(r[:-1].tolist()), {"target_tokens": r[1:].tolist()}) for r in rows]
        steps, captures, writes = [], [], []
        for k in range(4):
            sync(device)
            start = time.perf_counter()
            engine.forward_backward(run_id, data)
            engine.optim_step(run_id, ADAM)
            sync(device)
            steps.append(time.perf_counter() - start)
            start = time.perf_counter()
            captured = engine.capture_state(run_id)
            captures.append(time.perf_counter() - start)
            directory = workdir / f"snap-{i}-{k}"
            directory.mkdir()
            start = time.perf_counter()
            captured.write(directory)
            writes.append(time.perf_counter() - start)
        info = engine.run_info(run_id)
        mib = (info.adapter_bytes + info.optimizer_bytes) / 2**20
        step, cap, wr = (statistics.median(x[1:]) * 1e3 for x in (steps, captures, writes))
        print(f"{shape:>14} {mib:>18.0f} {step:>9.1f} {cap:>11.1f} {cap / step:>13.1%} {wr:>22.0f}")
        engine.delete_run(run_id)


if __name__ == "__main__":
    main()
