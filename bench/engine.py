"""Benchmark the engine against a plain in-process PEFT loop on the same model, side by side.

Training: ``Engine.forward_backward`` + ``optim_step`` against ``get_peft_model`` +
``model(input_ids, labels=input_ids).loss.backward()`` + ``torch.optim.AdamW``, both with LoRA
r=32, alpha=32 on every attention and MLP linear layer (q/k/v/o, gate/up/down; lm_head is NOT
adapted in either), on a randomly initialised Llama-3.2-1B-shaped model (bf16 on CUDA), 8
sequences x 1024 tokens per step. A third row runs the plain loop with TF32 matmuls, which the
engine uses for its float32 adapter matmuls when the base is bf16. Sampling: ``Engine.sample``
(32 samples x 128 new tokens, one prefill, KV cache) against ``model.generate`` (do_sample,
temperature 1, no top-k/top-p).

MFU counts, per trained token, 4*N (forward 2N + activation gradients 2N: the frozen base
weights get no gradient) + 6*N_lora + 12*L*T*d_attn (attention scores and values, forward and
backward, full T x T), where N is the number of weights of all base linear layers including
the (tied) lm_head; peak is 989 TFLOP/s (H100/H200 dense bf16).

    python bench/engine.py                       # GPU: full size
    uv run python bench/engine.py --device cpu --small   # quick local smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eztinker_tasks.engine import Engine, EngineConfig
from eztinker_tasks.types import (
    AdamParams,
    Datum,
    LoraSpec,
    SampleSource,
    SamplingParams,
)

PEAK_FLOPS = 989e12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Shape:
    config: LlamaConfig
    batch: int
    seq_len: int
    samples: int
    new_tokens: int
    prompt_len: int
    steps: int
    warmup: int


def shape(small: bool) -> Shape:
    if small:
        config = LlamaConfig(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        )
        return Shape(config, 2, 128, 4, 16, 16, steps=3, warmup=1)
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=128000,
        eos_token_id=128001,
    )
    return Shape(config, 8, 1024, 32, 128, 128, steps=8, warmup=2)


class PlainLoop:
    """The baseline: a plain PEFT training step, as a researcher would write it."""

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
        self.model: Any = model
        self.optimizer: Any = optimizer
        self.batch = batch

    def step(self) -> None:
        loss = self.model(input_ids=self.batch, labels=self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()

    def close(self) -> None:
        self.model = self.optimizer = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def flops_per_token(model: torch.nn.Module, s: Shape, lora_params: int) -> float:
    linear = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
    )  # base linears incl. lm_head (tied: counted once as the unembedding matmul)
    c = s.config
    d_attn = c.num_attention_heads * (c.hidden_size // c.num_attention_heads)
    return 4 * linear + 6 * lora_params + 12 * c.num_hidden_layers * s.seq_len * d_attn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--small", action="store_true", help="tiny shapes for a smoke run")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()

    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    s = shape(args.small)
    steps = args.steps or s.steps
    gen = torch.Generator().manual_seed(0)
    vocab = s.config.vocab_size
    tokens = torch.randint(0, vocab, (s.batch, s.seq_len + 1), generator=gen)
    prompt = torch.randint(0, vocab, (s.prompt_len,), generator=gen).tolist()

    workdir = Path(tempfile.mkdtemp(prefix="eztinker-bench-"))
    model_dir = workdir / "llama-1b-shaped"
    t0 = time.perf_counter()
    with torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(s.config, dtype=dtype)
    model.save_pretrained(model_dir)
    del model
    print(f"built and saved the model in {time.perf_counter() - t0:.1f}s", flush=True)

    # ---- engine
    engine = Engine(
        EngineConfig(
            data_dir=workdir / "data",
            checkpoints_dir=workdir / "ckpt",
            device=str(device),
            dtype={torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype],
        )
    )
    spec = LoraSpec(rank=32, alpha=32, train_attn=True, train_mlp=True, train_unembed=False, seed=0)
    info = engine.create_run("bench", str(model_dir), spec)
    data = [
        Datum(tokens=tuple(row[:-1].tolist()), loss_fn_inputs={"target_tokens": row[1:].tolist()})
        for row in tokens
    ]
    adam = AdamParams(learning_rate=1e-5)

    def engine_step() -> None:
        engine.forward_backward("bench", data)
        engine.optim_step("bench", adam)

    # ---- plain PEFT loop
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    plain.to(device)
    plain_config = LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    peft = get_peft_model(plain, plain_config)
    peft.train()
    plain_params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(plain_params, lr=1e-5, betas=(0.9, 0.95), eps=1e-12)
    loop = PlainLoop(peft, opt, tokens[:, :-1].to(device))
    del plain, peft, opt
    plain_step = loop.step

    def plain_step_tf32() -> None:
        """The same loop with TF32 for float32 matmuls, as the engine uses in bf16 mode."""
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            loop.step()
        finally:
            torch.set_float32_matmul_precision(previous)

    lora_params = info.trainable_params
    assert lora_params == sum(p.numel() for p in plain_params), "different LoRA targets"

    results: dict[str, dict[str, float]] = {}
    variants = {
        "plain PEFT loop": plain_step,
        "plain PEFT loop + TF32": plain_step_tf32,
        "engine": engine_step,
    }
    if device.type != "cuda":
        del variants["plain PEFT loop + TF32"]
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, float] = {}
    for _ in range(2):  # interleaved rounds, so clocks and caches treat both alike
        for name, fn in variants.items():
            reset_peak(device)
            rounds[name] += timed(fn, device, steps, s.warmup)
            peaks[name] = max(peaks.get(name, 0.0), peak_gib(device))
    fpt = flops_per_token(engine.models.get(str(model_dir)).model, s, lora_params)
    step_tokens = s.batch * s.seq_len
    for name, times in rounds.items():
        per_step = statistics.median(times)
        tps = step_tokens / per_step
        results[name] = {
            "step_s": per_step,
            "tokens_per_s": tps,
            "mfu": fpt * tps / PEAK_FLOPS,
            "peak_gib": peaks[name],
        }
    speedup = results["plain PEFT loop"]["step_s"] / results["engine"]["step_s"]

    run = engine.run_info("bench")
    memory = {
        "adapter_bytes": run.adapter_bytes,
        "optimizer_bytes": run.optimizer_bytes,
        "trainable_params": run.trainable_params,
    }

    # ---- what one more run costs on the device, and what deleting it gives back
    loop.close()
    del plain_step, plain_step_tf32, variants
    if device.type == "cuda":
        reset_peak(device)
        before = torch.cuda.memory_allocated(device)
        engine.create_run("extra", str(model_dir), spec)
        engine.forward_backward("extra", data[:1])
        engine.optim_step("extra", adam)
        gc.collect()
        memory["extra_run_cuda_bytes"] = torch.cuda.memory_allocated(device) - before
        engine.delete_run("extra")
        gc.collect()
        memory["after_delete_cuda_bytes"] = torch.cuda.memory_allocated(device) - before

    # ---- sampling: engine (adapters disabled, and the run's adapter) vs model.generate
    reset_peak(device)
    params = SamplingParams(max_tokens=s.new_tokens, temperature=1.0, stop=(), seed=0)
    sample_times: dict[str, float] = {}
    for name, source in (
        ("engine.sample (base)", SampleSource(base_model=str(model_dir))),
        ("engine.sample (run adapter)", SampleSource(run_id="bench")),
    ):

        def sample(src: SampleSource = source) -> None:
            engine.sample(src, prompt, s.samples, params)

        sample_times[name] = statistics.median(timed(sample, device, 3, 1))
    engine.delete_run("bench")
    gen_model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="sdpa"
    )
    gen_model.to(device)
    gen_model.eval()
    prompt_ids = torch.tensor([prompt] * s.samples, device=device)

    def generate() -> None:
        with torch.no_grad():
            out = gen_model.generate(
                input_ids=prompt_ids,
                attention_mask=torch.ones_like(prompt_ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=s.new_tokens,
                min_new_tokens=s.new_tokens,
                pad_token_id=0,
            )
        assert out.shape == (s.samples, s.prompt_len + s.new_tokens)

    sample_times["model.generate"] = statistics.median(timed(generate, device, 3, 1))

    # ---- report
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import peft as peft_pkg
    import transformers

    print()
    print(
        f"device: {name} | torch {torch.__version__} | transformers {transformers.__version__} "
        f"| peft {peft_pkg.__version__} | dtype {dtype}"
    )
    print(
        f"model: Llama-shaped, hidden {s.config.hidden_size}, {s.config.num_hidden_layers} "
        f"layers, vocab {vocab}, tied embeddings; LoRA r=32 alpha=32 on q/k/v/o/gate/up/down "
        f"(no lm_head), {lora_params:,} LoRA params; batch {s.batch} x {s.seq_len} tokens"
    )
    print(f"FLOPs per trained token: {fpt / 1e9:.3f} GFLOP (4N + 6N_lora + 12 L T d)")
    print()
    print("| training (fwd+bwd+AdamW) | step (s) | tokens/s | MFU | peak GiB |")
    print("|---|---|---|---|---|")
    for key, r in results.items():
        print(
            f"| {key} | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} "
            f"| {r['peak_gib']:.1f} |"
        )
    print(f"\nengine speed vs plain loop: {speedup:.3f}x")
    if "plain PEFT loop + TF32" in results:
        tf32_ratio = results["plain PEFT loop + TF32"]["step_s"] / results["engine"]["step_s"]
        print(f"engine speed vs plain loop with TF32: {tf32_ratio:.3f}x")
    print()
    total = s.samples * s.new_tokens
    print(f"| sampling ({s.samples} x {s.new_tokens} new tokens) | seconds | tokens/s |")
    print("|---|---|---|")
    for key, seconds in sample_times.items():
        print(f"| {key} | {seconds:.3f} | {total / seconds:,.0f} |")
    print()
    print(
        f"per-run memory: adapter {memory['adapter_bytes'] / 2**20:.1f} MiB + AdamW state "
        f"{memory['optimizer_bytes'] / 2**20:.1f} MiB = "
        f"{(memory['adapter_bytes'] + memory['optimizer_bytes']) / 2**20:.1f} MiB"
    )
    if "extra_run_cuda_bytes" in memory:
        print(
            f"measured on the device: one more run (after a step) "
            f"+{memory['extra_run_cuda_bytes'] / 2**20:.1f} MiB allocated; after delete_run "
            f"{memory['after_delete_cuda_bytes'] / 2**20:+.1f} MiB"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": name,
                    "training": results,
                    "speedup": speedup,
                    "sampling_s": sample_times,
                    "memory": memory,
                    "flops_per_token": fpt,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
