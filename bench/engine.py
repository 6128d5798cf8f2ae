"""Benchmark the training engine against a plain in-process PEFT loop, side by side, in one run.

Every row of issue 11's table, on random-weight models of real shapes (``shaped:<shape>``,
bf16 on CUDA), LoRA r=32 alpha=32 on every attention and MLP linear (no lm_head):

- ``train``: 8 x 1024 tokens, forward + backward + AdamW, on Llama-3.2-1B and Llama-3.1-8B
  shapes: the engine (``forward_backward`` + ``optim_step``) against ``get_peft_model`` +
  ``model(input_ids, labels=...).loss.backward()`` + ``torch.optim.AdamW`` on an identical model.
- ``cycle``: 16 runs on the 1B shape, each one 1 x 128 forward_backward + optim_step: one run
  after another (as before the clock cycle), all in one pass (``Engine.run_calls``), and the same
  2,048 tokens as ONE run's batch (the ceiling).
- ``small``: one 1 x 128 step (fwd + bwd + AdamW) on the Qwen2.5-0.5B shape, engine vs PEFT.
- ``long``: ONE datum of T tokens, forward + backward, on the 1B shape (T = 131,072) and the 8B
  shape (T = 65,536): the engine switches activation checkpointing on by itself.

MFU counts, per trained token, 4*N (forward 2N + activation gradients 2N: the frozen base
weights get no gradient) + 6*N_lora + 12*L*T*d_attn (attention scores and values, forward and
backward, full T x T), N the weights of all base linear layers including lm_head; peak 989
TFLOP/s (H100/H200 dense bf16).

    python bench/engine.py                                    # GPU: every section
    python bench/engine.py --only cycle small                  # some sections
    uv run python bench/engine.py --device cpu --small         # quick local smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eztinker_tasks.engine import Engine, EngineConfig
from eztinker_tasks.shapes import SHAPES
from eztinker_tasks.types import AdamParams, CallSpec, Datum, LoraSpec

PEAK_FLOPS = 989e12
RANK = 32
ADAM = AdamParams(learning_rate=1e-5)
LORA = LoraSpec(rank=RANK, alpha=RANK, train_attn=True, train_mlp=True, train_unembed=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds of ``fn`` over ``steps`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def bench_engine(device: torch.device, workdir: Path) -> tuple[Engine, torch.dtype]:
    """An engine under ``workdir`` on ``device`` (bf16 on CUDA, float32 elsewhere), its dtype."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engine = Engine(
        EngineConfig(
            data_dir=workdir / "data",
            checkpoints_dir=workdir / "ckpt",
            device=str(device),
            dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
        )
    )
    return engine, dtype


class Bench:
    def __init__(self, device: torch.device, small: bool, workdir: Path) -> None:
        self.device = device
        self.small = small
        self.engine, self.dtype = bench_engine(device, workdir)
        self.rows: list[dict[str, Any]] = []
        self.gen = torch.Generator().manual_seed(0)

    # -- helpers
    def model_name(self, shape: str) -> str:
        if self.small:  # --small: the built-in tiny Llama stands in for every shape
            return "tiny-llama"
        return f"shaped:{shape}"

    def tokens(self, shape: str, batch: int, length: int) -> torch.Tensor:
        vocab = 2048 if self.small else int(SHAPES[shape]["vocab_size"])
        return torch.randint(0, vocab, (batch, length + 1), generator=self.gen)

    @staticmethod
    def data(tokens: torch.Tensor) -> list[Datum]:
        return [
            Datum(tuple(row[:-1].tolist()), {"target_tokens": row[1:].tolist()}) for row in tokens
        ]

    def flops_per_token(self, model: torch.nn.Module, lora_params: int, seq_len: int) -> float:
        linear = sum(
            m.weight.numel()
            for m in model.modules()
            if isinstance(m, torch.nn.Linear) and "lora" not in type(m).__name__.lower()
        )
        c = getattr(model, "config")  # noqa: B009
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        d_attn = c.num_attention_heads * head_dim
        return 4 * linear + 6 * lora_params + 12 * c.num_hidden_layers * seq_len * d_attn

    def plain_peft(self, shape: str, tokens: torch.Tensor) -> tuple[Callable[[], None], Any]:
        """The baseline: an identical model under plain PEFT, a plain training step."""
        engine_config = getattr(self.engine.models.get(self.model_name(shape)).model, "config")  # noqa: B009
        config = type(engine_config).from_dict(engine_config.to_dict())  # the same shape
        config._attn_implementation = "sdpa"
        with torch.random.fork_rng(devices=[]), torch.device(self.device):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        peft = get_peft_model(
            model, LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=targets)
        )
        peft.train()
        params = [p for p in peft.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-12)
        batch = tokens.to(self.device)

        def step() -> None:
            loss = peft(input_ids=batch[:, :-1], labels=batch[:, 1:], use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()

        return step, (peft, opt)

    def row(self, **row: Any) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    # -- sections
    def train(self, shape: str, batch: int = 8, length: int = 1024) -> None:
        if self.small:
            batch, length = 2, 128
        tokens = self.tokens(shape, batch, length)
        data = self.data(tokens)
        name = self.model_name(shape)
        info = self.engine.create_run("train", name, LORA)
        model = self.engine.models.get(name).model
        fpt = self.flops_per_token(model, info.trainable_params, length)

        def engine_step() -> None:
            self.engine.forward_backward("train", data)
            self.engine.optim_step("train", ADAM)

        plain_step, keep = self.plain_peft(shape, tokens)
        steps, warmup = (3, 1) if self.small else (6, 2)
        results = {}
        for _ in range(2):  # interleaved rounds, so clocks and caches treat both alike
            for label, fn in (("plain PEFT", plain_step), ("engine", engine_step)):
                reset(self.device)
                seconds = timed(fn, self.device, steps, warmup)
                best = results.get(label)
                if best is None or seconds < best[0]:
                    results[label] = (seconds, peak_gib(self.device))
        del keep, plain_step
        self.engine.delete_run("train")
        for label, (seconds, peak) in results.items():
            tps = batch * length / seconds
            self.row(
                section="train",
                shape=shape,
                variant=label,
                step_s=seconds,
                tokens_per_s=tps,
                mfu=fpt * tps / PEAK_FLOPS,
                peak_gib=peak,
            )
        self.row(
            section="train",
            shape=shape,
            variant="speedup engine / plain",
            ratio=results["plain PEFT"][0] / results["engine"][0],
        )
        reset(self.device)

    def cycle(self, shape: str = "llama-3.2-1b", runs: int = 16, length: int = 128) -> None:
        name = self.model_name(shape)
        ids = [f"c{i}" for i in range(runs)]
        for i, run_id in enumerate(ids):
            self.engine.create_run(run_id, name, LoraSpec.from_dict({**LORA.to_dict(), "seed": i}))
        per_run = [self.data(self.tokens(shape, 1, length)) for _ in ids]

        def one_after_another() -> None:
            for run_id, data in zip(ids, per_run, strict=True):
                self.engine.forward_backward(run_id, data)
                self.engine.optim_step(run_id, ADAM)

        def one_pass() -> None:
            outs = self.engine.run_calls(
                [CallSpec(r, d) for r, d in zip(ids, per_run, strict=True)]
            )
            assert all(getattr(o, "batch", {"runs": 0})["runs"] == runs for o in outs), outs
            for run_id in ids:
                self.engine.optim_step(run_id, ADAM)

        joined = [d for data in per_run for d in data]

        def one_run_batch() -> None:
            self.engine.forward_backward(ids[0], joined)
            self.engine.optim_step(ids[0], ADAM)

        steps, warmup = (3, 1) if self.small else (5, 2)
        for label, fn in (
            (f"{runs} runs one after another", one_after_another),
            (f"{runs} runs in one pass (run_calls)", one_pass),
            (f"the same {runs * length} tokens as one run's batch", one_run_batch),
        ):
            reset(self.device)
            seconds = timed(fn, self.device, steps, warmup)
            self.row(
                section="cycle",
                shape=shape,
                variant=label,
                cycle_ms=seconds * 1e3,
                tokens_per_s=runs * length / seconds,
                peak_gib=peak_gib(self.device),
            )
        for run_id in ids:
            self.engine.delete_run(run_id)
        reset(self.device)

    def small_step(self, shape: str = "qwen2.5-0.5b", length: int = 128) -> None:
        tokens = self.tokens(shape, 1, length)
        data = self.data(tokens)
        self.engine.create_run("small", self.model_name(shape), LORA)

        def engine_step() -> None:
            self.engine.forward_backward("small", data)
            self.engine.optim_step("small", ADAM)

        plain_step, keep = self.plain_peft(shape, tokens)
        steps, warmup = (3, 1) if self.small else (20, 5)
        for label, fn in (("plain PEFT", plain_step), ("engine", engine_step)):
            reset(self.device)
            seconds = timed(fn, self.device, steps, warmup)
            self.row(section="small", shape=shape, variant=label, step_ms=seconds * 1e3)
        del keep, plain_step
        self.engine.delete_run("small")
        reset(self.device)

    def long_rows(self) -> None:
        self.long("llama-3.2-1b", 131072)
        self.long("llama-3.1-8b", 65536)

    def long(self, shape: str, length: int) -> None:
        if self.small:
            length = 2048
        data = self.data(self.tokens(shape, 1, length))
        self.engine.create_run("long", self.model_name(shape), LORA)
        reset(self.device)
        try:
            seconds = timed(lambda: self.engine.forward_backward("long", data), self.device, 1, 1)
            out = self.engine.forward_backward("long", data)
            self.row(
                section="long",
                shape=shape,
                tokens=length,
                fits=True,
                fwd_bwd_s=seconds,
                tokens_per_s=length / seconds,
                peak_gib=peak_gib(self.device),
                activation_checkpointing=(out.batch or {}).get("activation_checkpointing"),
            )
        except Exception as exc:
            self.row(section="long", shape=shape, tokens=length, fits=False, error=repr(exc)[:300])
        self.engine.delete_run("long")
        reset(self.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--small", action="store_true", help="tiny shapes for a smoke run")
    parser.add_argument(
        "--only", nargs="*", default=["cycle", "small", "train1b", "train8b", "long"]
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    bench = Bench(device, args.small, Path(tempfile.mkdtemp(prefix="eztinker-bench-")))
    import peft as peft_pkg
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"# device {name} | torch {torch.__version__} | transformers {transformers.__version__}"
        f" | peft {peft_pkg.__version__} | dtype {bench.dtype}",
        flush=True,
    )
    sections: dict[str, Callable[[], None]] = {
        "cycle": bench.cycle,
        "small": bench.small_step,
        "train1b": lambda: bench.train("llama-3.2-1b"),
        "train8b": lambda: bench.train("llama-3.1-8b"),
        "long": bench.long_rows,
    }
    for key in args.only:
        started = time.perf_counter()
        try:
            sections[key]()
        except Exception:
            traceback.print_exc()
            bench.row(section=key, error=traceback.format_exc()[-600:])
        print(f"# {key}: {time.perf_counter() - started:.1f} s", flush=True)
        reset(device)
    if args.json:
        args.json.write_text(json.dumps(bench.rows, indent=2))


if __name__ == "__main__":
    main()
