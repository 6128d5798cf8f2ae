"""Profile one engine step with torch.profiler: where the time of a bench/engine.py row goes.

    python bench/profile_engine.py --case cycle --out /tmp/prof    # GPU: tables + a trace
    uv run python bench/profile_engine.py --device cpu --small --case small

Cases: ``cycle`` (16 runs x 1 x 128 in one pass + their optim steps, 1B shape), ``small`` (one
1 x 128 step, 0.5B shape), ``train`` (8 x 1024, 1B shape). Prints the top operators by device
time and by host time, and the number of kernel launches.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import ADAM, LORA, Bench  # bench/engine.py

from eztinker_tasks.types import CallSpec, Datum, LoraSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--case", choices=["cycle", "small", "train"], default="cycle")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    )
    bench = Bench(device, args.small, Path(tempfile.mkdtemp(prefix="eztinker-prof-")))
    engine = bench.engine
    if args.case == "cycle":
        name = bench.model_name("llama-3.2-1b")
        ids = [f"c{i}" for i in range(16)]
        for i, run_id in enumerate(ids):
            engine.create_run(run_id, name, LoraSpec.from_dict({**LORA.to_dict(), "seed": i}))
        per_run: list[list[Datum]] = [bench.data(bench.tokens("llama-3.2-1b", 1, 128)) for _ in ids]

        def step() -> None:
            engine.run_calls([CallSpec(r, d) for r, d in zip(ids, per_run, strict=True)])
            for run_id in ids:
                engine.optim_step(run_id, ADAM)

    else:
        shape, batch, length = (
            ("qwen2.5-0.5b", 1, 128) if args.case == "small" else ("llama-3.2-1b", 8, 1024)
        )
        engine.create_run("p", bench.model_name(shape), LORA)
        data = bench.data(bench.tokens(shape, batch, length))

        def step() -> None:
            engine.forward_backward("p", data)
            engine.optim_step("p", ADAM)

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    sort = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    table = events.table(sort_by=sort, row_limit=40, max_name_column_width=60)
    host = events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
    text = f"{args.case}: {kernels} device kernels\n\n{table}\n\nby host time:\n{host}\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.case}.txt").write_text(text)


if __name__ == "__main__":
    main()
