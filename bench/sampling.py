"""Benchmark sampling: the engine's decode batch against ``model.generate``, side by side, one run.

Issue 12's rows, on random-weight models of real shapes (``shaped:<shape>``, bf16 on CUDA),
LoRA r=32 on every attention and MLP linear, a 128-token prompt, ``max_tokens`` new tokens,
temperature 1, no stop (every sequence runs to the end):

- ``base``: 32 x 128 from the bare base: engine (``engine.decode``), the engine's previous
  transformers-cache sampler (``sampler.generate``), and ``model.generate`` on an identical
  model.
- ``adapter``: 32 x 128 from one run's adapter: engine, previous sampler, and PEFT's
  ``model.generate`` (LoRA unmerged, as a live run is).
- ``many``: 32 requests (1 sample each) from 32 different runs' adapters: ONE ``sample_many``
  batch against the same requests one after another (``Engine.sample``).
- ``single``: one sequence: engine against ``model.generate``.
- ``join``: a 1 x 16 request arriving 0.5 s into a 64 x 1,024 job (8 x 900 with
  ``--small``): its time from arrival to its last token, joining the running batch
  (continuous batching) against waiting for the job to end (as a queue would).

Throughput is new tokens per second of wall time (prefill included).

    python bench/sampling.py                           # GPU: 8B shape (and 1B for ``adapter``)
    uv run python bench/sampling.py --device cpu --small   # the tiny Llama, a quick local run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import bench_engine, reset, sync  # bench/engine.py (this script's folder)

from eztinker_tasks.engine import decode as decoding
from eztinker_tasks.shapes import SHAPES
from eztinker_tasks.types import LoraSpec, SampleCall, SampleSource, SamplingParams

RANK = 32
LORA = LoraSpec(rank=RANK, alpha=RANK, train_attn=True, train_mlp=True, train_unembed=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def timed(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: bool = True
) -> float:
    """Best wall seconds of ``fn`` over ``repeats`` calls, after one warm-up call."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


class Bench:
    def __init__(self, device: torch.device, small: bool, workdir: Path, repeats: int) -> None:
        self.device, self.small, self.repeats = device, small, repeats
        self.engine, self.dtype = bench_engine(device, workdir)
        self.rows: list[dict[str, Any]] = []
        self.gen = torch.Generator().manual_seed(0)

    def model_name(self, shape: str) -> str:
        return "tiny-llama" if self.small else f"shaped:{shape}"

    def prompt(self, shape: str, length: int) -> list[int]:
        vocab = 2048 if self.small else int(SHAPES[shape]["vocab_size"])
        return torch.randint(1, vocab, (length,), generator=self.gen).tolist()

    def hf_model(self, shape: str, adapter: bool) -> Any:
        """An identical model (same config) for ``model.generate``, PEFT-wrapped if asked."""
        engine_model = self.engine.models.get(self.model_name(shape)).model
        config = getattr(engine_model, "config")  # noqa: B009
        config = type(config).from_dict(config.to_dict())
        config._attn_implementation = "sdpa"
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        model.eval()
        if adapter:
            lora = LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=TARGETS)
            model = get_peft_model(model, lora)
        return model

    def row(self, **row: Any) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def generate_s(self, model: Any, prompt: list[int], n: int, new: int) -> float:
        ids = torch.tensor([prompt] * n, device=self.device)

        def run() -> None:
            with torch.no_grad():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    pad_token_id=0,
                )

        return timed(run, self.device, self.repeats)

    def engine_s(self, source: SampleSource, prompt: list[int], n: int, new: int) -> float:
        params = SamplingParams(max_tokens=new, temperature=1.0, stop=())
        return timed(
            lambda: self.engine.sample(source, prompt, n, params), self.device, self.repeats
        )

    def previous_s(self, source: SampleSource, prompt: list[int], n: int, new: int) -> float:
        """The engine's transformers-cache sampler (before ``engine.decode``)."""
        saved = decoding.SUPPORTED_MODEL_TYPES
        decoding.SUPPORTED_MODEL_TYPES = frozenset()
        try:
            return self.engine_s(source, prompt, n, new)
        finally:
            decoding.SUPPORTED_MODEL_TYPES = saved

    def one_source(self, section: str, shape: str, adapter: bool, n: int, new: int) -> None:
        name = self.model_name(shape)
        source = SampleSource(base_model=name)
        if adapter:
            self.engine.create_run("bench", name, LORA)
            source = SampleSource(run_id="bench")
        prompt = self.prompt(shape, 128 if not self.small else 32)
        tokens = n * new
        engine = self.engine_s(source, prompt, n, new)
        previous = self.previous_s(source, prompt, n, new)
        model = self.hf_model(shape, adapter)
        generate = self.generate_s(model, prompt, n, new)
        del model
        self.row(
            section=section,
            shape=shape if not self.small else "tiny-llama",
            sequences=n,
            new_tokens=new,
            engine_tok_s=round(tokens / engine, 1),
            previous_sampler_tok_s=round(tokens / previous, 1),
            generate_tok_s=round(tokens / generate, 1),
            engine_vs_generate=round(generate / engine, 2),
        )
        if adapter:
            self.engine.delete_run("bench")
        reset(self.device)

    def many(self, shape: str, runs: int, new: int) -> None:
        name = self.model_name(shape)
        for i in range(runs):
            self.engine.create_run(f"r{i}", name, LORA)
        prompt = self.prompt(shape, 128 if not self.small else 32)
        params = SamplingParams(max_tokens=new, temperature=1.0, stop=())
        calls = [SampleCall(SampleSource(run_id=f"r{i}"), prompt, 1, params) for i in range(runs)]
        batch = timed(lambda: self.engine.sample_many(calls), self.device, self.repeats)

        def one_by_one() -> None:
            for call in calls:
                self.engine.sample(call.source, call.prompt_tokens, 1, params)

        # The batch warmed every kernel up: the slow one-by-one loop is timed once, cold.
        sequential = timed(one_by_one, self.device, 1, warmup=False)
        self.row(
            section="many",
            shape=shape if not self.small else "tiny-llama",
            requests=runs,
            adapters=runs,
            new_tokens=new,
            one_batch_tok_s=round(runs * new / batch, 1),
            one_after_another_tok_s=round(runs * new / sequential, 1),
            speedup=round(sequential / batch, 2),
        )
        for i in range(runs):
            self.engine.delete_run(f"r{i}")
        reset(self.device)

    def join(self, shape: str, rows: int, new: int) -> None:
        name = self.model_name(shape)
        prompt = self.prompt(shape, 128 if not self.small else 32)
        job = SampleCall(
            SampleSource(base_model=name),
            prompt,
            rows,
            SamplingParams(max_tokens=new, temperature=1.0, stop=()),
        )
        short = SampleCall(
            SampleSource(base_model=name), prompt[:16], 1, SamplingParams(max_tokens=16, stop=())
        )
        self.engine.sample_many([short])  # warm-up
        arrived: list[float] = []
        ended: dict[int, float] = {}

        def poll() -> list[SampleCall]:
            if arrived or time.perf_counter() - started < 0.5:
                return []
            arrived.append(time.perf_counter())
            return [short]

        def done(index: int, _outcome: object) -> None:
            sync(self.device)
            ended[index] = time.perf_counter()

        started = time.perf_counter()
        self.engine.sample_many([job], poll=poll, on_done=done)
        waited = ended[0] - arrived[0]  # a queue: it would start after the job
        alone = timed(lambda: self.engine.sample_many([short]), self.device, self.repeats)
        self.row(
            section="join",
            shape=shape if not self.small else "tiny-llama",
            job=f"{rows} x {new}",
            arrival_to_answer_joined_s=round(ended[1] - arrived[0], 3),
            arrival_to_answer_queued_s=round(waited + alone, 3),
            alone_s=round(alone, 3),
        )
        reset(self.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--small", action="store_true", help="the tiny Llama, a quick run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only", nargs="*", default=["base", "adapter", "many", "single", "join", "adapter1b"]
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    )
    workdir = Path(tempfile.mkdtemp(prefix="eztinker-bench-"))
    bench = Bench(device, args.small, workdir, args.repeats)
    new = 32 if args.small else 128
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# device {name} | torch {torch.__version__} | dtype {bench.dtype}", flush=True)
    sections: dict[str, Callable[[], None]] = {
        "base": lambda: bench.one_source("base", "llama-3.1-8b", False, 32, new),
        "adapter": lambda: bench.one_source("adapter", "llama-3.1-8b", True, 32, new),
        "many": lambda: bench.many("llama-3.1-8b", 32, new),
        "single": lambda: bench.one_source("single", "llama-3.1-8b", True, 1, new),
        "adapter1b": lambda: bench.one_source("adapter1b", "llama-3.2-1b", True, 32, new),
        "single1b": lambda: bench.one_source("single1b", "llama-3.2-1b", True, 1, new),
        "many1b": lambda: bench.many("llama-3.2-1b", 32, new),
        "join": lambda: bench.join(
            "llama-3.1-8b", 8 if args.small else 64, 900 if args.small else 1024
        ),
    }
    for key in args.only:
        started = time.perf_counter()
        sections[key]()
        print(f"# {key}: {time.perf_counter() - started:.1f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(bench.rows, indent=2))


if __name__ == "__main__":
    main()
