"""Multi-GPU engine figures, without the broker: sharded 70B training + sampling, 8B scaling.

    python bench/multigpu.py            # needs 2 GPUs; prints a table, writes --out JSON

Cases (each in fresh processes, one per rank, joined by NCCL exactly as a multi-GPU worker's
ranks are: ``lockstep.init``, ``LeadEngine`` on rank 0, ``follow`` on the others):

- ``70b``: ``shaped:llama-3.1-70b`` (bf16, built shard by shard) on K=2 GPUs, LoRA r32 on
  every attention/MLP/unembedding layer; a step is forward_backward of 4 x 1024 tokens plus
  optim_step. Then one sample call (8 sequences, 128-token prompt, 32 new tokens).
- ``70b-8ck``: the same with 8 x 1024 tokens per step and activation checkpointing (each
  layer's forward recomputed in the backward).
- ``8b-1`` / ``8b-2``: ``shaped:llama-3.1-8b``, 8 x 1024 tokens per GPU per step, on 1 GPU
  (plain engine) and on 2 (sharded, data parallel). Ratio = tokens/s on 2 over tokens/s on 1.

MFU counts 4 N FLOPs per trained token (the base is frozen: forward 2N, backward 2N for the
activation gradients, no weight gradients; LoRA and attention FLOPs left out) against 989
TFLOP/s dense bf16 per H200.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eztinker_tasks.engine import Engine, EngineConfig, lockstep
from eztinker_tasks.engine.commands import follow
from eztinker_tasks.engine.distributed import LeadEngine
from eztinker_tasks.types import (
    AdamParams,
    Datum,
    LoraSpec,
    SampleSource,
    SamplingParams,
)

PEAK = 989e12  # dense bf16 FLOP/s per H200 (datasheet)
PARAMS = {"shaped:llama-3.1-70b": 70.55e9, "shaped:llama-3.1-8b": 8.03e9}


def batch(n: int, length: int, seed: int) -> list[Datum]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 2000, (length + 1,), generator=g).tolist()
        out.append(Datum(tuple(ids[:-1]), {"target_tokens": ids[1:]}))
    return out


def train(engine, base: str, seqs: int, steps: int, sample: bool) -> dict:
    engine.create_run("bench", base, LoraSpec(rank=32, seed=1))
    data = [batch(seqs, 1024, s) for s in range(steps + 1)]
    times = []
    loss = 0.0
    for i, d in enumerate(data):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = engine.forward_backward("bench", d)
        engine.optim_step("bench", AdamParams(learning_rate=1e-4))
        torch.cuda.synchronize()
        if i > 0:  # the first step warms up
            times.append(time.perf_counter() - t0)
        loss = out.metrics["loss:sum"]
    result = {"step_s": sorted(times)[len(times) // 2], "tokens": seqs * 1024, "loss": loss}
    if sample:
        prompt = batch(1, 128, 99)[0].tokens
        params = SamplingParams(max_tokens=32, temperature=1.0, seed=5)
        engine.sample(SampleSource(run_id="bench"), prompt, 8, params)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        s = engine.sample(SampleSource(run_id="bench"), prompt, 8, params)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        made = sum(len(q.tokens) for q in s.sequences)
        result.update(sample_s=elapsed, sample_tokens=made)
    return result


def rank_main(rank: int, world: int, init: str, case: dict, out: str) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    tmp = Path(tempfile.mkdtemp())
    config = EngineConfig(
        data_dir=Path(case["data_dir"]),
        checkpoints_dir=tmp / "ckpt",
        device=str(device),
        dtype="bfloat16",
        activation_checkpointing=case.get("checkpointing", "auto"),
    )
    t0 = time.perf_counter()
    if world == 1:
        engine = Engine(config)
        engine.models.get(case["base"])
        load_s = time.perf_counter() - t0
        result = train(engine, case["base"], case["seqs"], case["steps"], case["sample"])
        result["mem_gib"] = [torch.cuda.max_memory_allocated(device) / 2**30]
    else:
        group = lockstep.init(rank, world, device, init, timeout_s=600)
        engine = Engine(config)
        with lockstep.running():
            engine.models.get(case["base"])  # every rank builds its shards
        load_s = time.perf_counter() - t0
        if rank == 0:
            lead = LeadEngine(engine, group)
            result = train(lead, case["base"], case["seqs"], case["steps"], case["sample"])
            lead.stop()
        else:
            follow(engine, group)
            result = {}
        mem = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
        every = [torch.zeros_like(mem) for _ in range(world)]
        dist.all_gather(every, mem)
        result["mem_gib"] = [float(m) for m in every]
        dist.destroy_process_group()
    if rank == 0:
        result["load_s"] = load_s
        Path(out).write_text(json.dumps(result))


def run_case(name: str, case: dict, world: int, out_dir: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = out_dir / f"{name}.json"
    init = f"tcp://127.0.0.1:{port}"
    t0 = time.perf_counter()
    mp.start_processes(rank_main, args=(world, init, case, str(out)), nprocs=world, join=True)
    result = json.loads(out.read_text())
    result.update(case=name, gpus=world, wall_s=time.perf_counter() - t0)
    tokens = result["tokens"]
    result["tokens_per_s"] = tokens / result["step_s"]
    flops = 4 * PARAMS[case["base"]] * tokens
    result["mfu"] = flops / result["step_s"] / (PEAK * world)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="8b-1,8b-2,70b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    out_dir = Path(args.out)
    data_dir = Path(tempfile.mkdtemp())
    from eztinker_tasks import catalog

    catalog.ensure_tokenizer("tiny-llama", data_dir)
    common = {"data_dir": str(data_dir), "steps": args.steps}
    cases = {
        "8b-1": ({"base": "shaped:llama-3.1-8b", "seqs": 8, "sample": False}, 1),
        "8b-2": ({"base": "shaped:llama-3.1-8b", "seqs": 16, "sample": False}, 2),
        "70b": ({"base": "shaped:llama-3.1-70b", "seqs": 4, "sample": True}, 2),
        "70b-8ck": (
            {"base": "shaped:llama-3.1-70b", "seqs": 8, "sample": False, "checkpointing": "always"},
            2,
        ),
    }
    results = {}
    for name in args.cases.split(","):
        case, world = cases[name]
        try:
            results[name] = run_case(name, {**common, **case}, world, out_dir)
        except Exception as exc:  # report the others
            print(f"case {name} failed: {exc}", flush=True)
    (out_dir / "multigpu.json").write_text(json.dumps(results, indent=1))
    print(
        f"\n{'case':6} {'gpus':>4} {'tokens/step':>11} {'step s':>7} {'tokens/s':>9} "
        f"{'MFU':>6} {'GiB per GPU':>16} {'sample tok/s':>12}"
    )
    for name, r in results.items():
        sample = f"{r['sample_tokens'] / r['sample_s']:.1f}" if "sample_s" in r else "-"
        mem = "/".join(f"{m:.1f}" for m in r["mem_gib"])
        print(
            f"{name:6} {r['gpus']:>4} {r['tokens']:>11} {r['step_s']:>7.3f} "
            f"{r['tokens_per_s']:>9.0f} {r['mfu']:>6.1%} {mem:>16} {sample:>12}"
        )
    if "8b-1" in results and "8b-2" in results:
        ratio = results["8b-2"]["tokens_per_s"] / results["8b-1"]["tokens_per_s"]
        print(f"8B: 2 GPUs / 1 GPU throughput = {ratio:.2f}x (target >= 1.8x)")


if __name__ == "__main__":
    main()
