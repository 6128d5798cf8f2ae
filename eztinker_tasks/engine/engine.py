"""The ``Engine`` facade: the one object the tasks layer drives (see docs/ENGINE_SPEC.md).

It owns all GPU state of a worker: the loaded bases (``ModelRegistry``), the live runs
(``RunState``: adapter + optimizer + RNG) and an LRU of saved checkpoints loaded as extra
adapters for sampling. Each operation validates its whole request first (typed errors from
``eztinker_tasks.errors``), then switches the base's active adapter explicitly, then runs.
One operation at a time; nothing is shared across Engine instances.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eztinker_tasks import checkpoint_paths
from eztinker_tasks.engine import adapters, checkpoints, losses, sampler, training
from eztinker_tasks.engine.batching import build_batch, check_length, token_array
from eztinker_tasks.engine.config import EngineConfig, resolve_device, resolve_dtype
from eztinker_tasks.engine.models import LoadedBase, ModelRegistry
from eztinker_tasks.engine.runs import RunState, checked_lora_spec, make_optimizer
from eztinker_tasks.errors import Conflict, InvalidRequest, UnknownRun
from eztinker_tasks.loss_specs import get_loss_spec, resolve_loss_config
from eztinker_tasks.types import (
    AdamParams,
    CheckpointInfo,
    Datum,
    ForwardBackwardOutput,
    LoraSpec,
    ModelInfo,
    OptimStepOutput,
    ProgressFn,
    RunInfo,
    SampleOutput,
    SampleSource,
    SamplingParams,
)


@dataclass
class _SamplerAdapter:
    """A saved checkpoint loaded as an extra adapter of its base, for sampling only."""

    base: LoadedBase
    adapter: str
    version: float  # the checkpoint's created_at: a re-saved checkpoint is reloaded


class Engine:
    """LoRA training and sampling on shared, frozen base models (one worker's GPU state)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._device = resolve_device(config.device)
        self._dtype = resolve_dtype(config.dtype, self._device)
        self.models = ModelRegistry(Path(config.data_dir), self._device, self._dtype)
        self._runs: dict[str, RunState] = {}
        self._samplers: OrderedDict[str, _SamplerAdapter] = OrderedDict()
        self._names = itertools.count()
        self._tf32 = config.tf32 and self._device.type == "cuda" and self._dtype != torch.float32
        self._generator = torch.Generator(self._device)
        self._generator.manual_seed(secrets.randbits(62))

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    # ------------------------------------------------------------------ models

    def list_models(self) -> list[ModelInfo]:
        return self.models.list_models()

    def model_info(self, base_model: str) -> ModelInfo:
        return self.models.model_info(base_model)

    # ------------------------------------------------------------------ runs

    def create_run(self, run_id: str, base_model: str, lora: LoraSpec) -> RunInfo:
        checkpoint_paths.validate_name(run_id, "run_id")
        if run_id in self._runs:
            raise Conflict(f"run {run_id!r} already exists", errors={"run_id": [run_id]})
        spec = checked_lora_spec(lora)
        base = self.models.get(base_model)
        if not adapters.target_modules(base.targets, spec):
            raise InvalidRequest(
                f"LoRA spec trains nothing on {base_model!r}: no matching modules",
                errors={"lora": ["no target modules"]},
            )
        assert spec.seed is not None
        adapter = self._add_adapter(base, "r", spec, spec.seed)
        assert base.peft is not None
        params = adapters.adapter_parameters(base.peft, adapter)
        generator = torch.Generator(self._device)
        generator.manual_seed(spec.seed)
        self._runs[run_id] = RunState(
            run_id=run_id,
            base=base,
            adapter=adapter,
            lora=spec,
            params=params,
            optimizer=make_optimizer(list(params.values()), self._device),
            generator=generator,
        )
        return self._runs[run_id].info()

    def create_run_from_checkpoint(self, run_id: str, path: str, optimizer: bool = True) -> RunInfo:
        checkpoint_paths.validate_name(run_id, "run_id")
        if run_id in self._runs:
            raise Conflict(f"run {run_id!r} already exists", errors={"run_id": [run_id]})
        _, meta = checkpoints.resolve_existing(self._ckpt_dir, path)
        checkpoints.check_kind(meta, optimizer)
        self.create_run(run_id, str(meta["base_model"]), checkpoints.lora_spec(meta))
        try:
            return self.load_state(run_id, path, optimizer=optimizer)
        except BaseException:
            self.delete_run(run_id)
            raise

    def has_run(self, run_id: str) -> bool:
        return run_id in self._runs

    def list_runs(self) -> list[str]:
        return sorted(self._runs)

    def run_info(self, run_id: str) -> RunInfo:
        return self._run(run_id).info()

    def delete_run(self, run_id: str) -> None:
        run = self._run(run_id)
        del self._runs[run_id]
        run.optimizer.state.clear()
        for param in run.params.values():
            param.grad = None
        run.params.clear()
        self._remove_adapter(run.base, run.adapter)

    # ------------------------------------------------------------------ training

    def forward_backward(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
    ) -> ForwardBackwardOutput:
        """One batched forward+backward; gradients accumulate until ``optim_step``."""
        return self._loss_pass(run_id, [data], loss_fn, loss_fn_config, backward=True)[0]

    def forward(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
    ) -> ForwardBackwardOutput:
        """Same outputs as ``forward_backward``; no gradient, no state change."""
        return self._loss_pass(run_id, [data], loss_fn, loss_fn_config, backward=False)[0]

    def forward_backward_many(
        self,
        run_id: str,
        groups: Sequence[Sequence[Datum]],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        backward: bool = True,
        progress: ProgressFn | None = None,
    ) -> list[ForwardBackwardOutput]:
        """Several consecutive ``forward_backward`` (or ``forward``) calls in ONE pass.

        Each group's outputs and metrics are those its own call would return, and the
        accumulated gradient is that of all of them; used to coalesce queued operations.
        ``progress`` is told the ``forward`` / ``backward`` phases (``engine.progress``).
        """
        return self._loss_pass(
            run_id, groups, loss_fn, loss_fn_config, backward=backward, progress=progress
        )

    def optim_step(self, run_id: str, params: AdamParams) -> OptimStepOutput:
        run = self._run(run_id)
        training.check_adam_params(params)
        return training.optim_step(run, params)

    def _loss_pass(
        self,
        run_id: str,
        groups: Sequence[Sequence[Datum]],
        loss_fn: str,
        loss_fn_config: Mapping[str, Any] | None,
        *,
        backward: bool,
        progress: ProgressFn | None = None,
    ) -> list[ForwardBackwardOutput]:
        run = self._run(run_id)
        spec = get_loss_spec(loss_fn)
        config = resolve_loss_config(spec, loss_fn_config)
        info = run.base.info
        if not groups or any(len(g) == 0 for g in groups):
            raise InvalidRequest("data must be a non-empty list of datums", errors={"data": []})
        data = [datum for group in groups for datum in group]
        batch = build_batch(data, spec, info.vocab_size, info.max_context, self._device)
        if loss_fn not in losses.LOSS_FNS:
            raise InvalidRequest(
                f"loss_fn {loss_fn!r} is not implemented by this engine yet",
                errors={"loss_fn": [f"not implemented: {loss_fn}"]},
            )
        with self._weights(run.base, run.adapter) as model:
            outputs = training.run_loss(
                model,
                batch,
                loss_fn,
                config,
                backward=backward,
                chunk_elements=self.config.logprob_chunk_elements,
                group_sizes=[len(g) for g in groups],
                progress=progress,
            )
        if backward:
            run.tokens_trained += batch.num_tokens
            run.last_loss = outputs[-1].metrics["loss:sum"]
        return outputs

    # ------------------------------------------------------------------ sampling

    def sample(
        self,
        source: SampleSource,
        prompt_tokens: Sequence[int],
        num_samples: int,
        params: SamplingParams,
        prompt_logprobs: bool = False,
        progress: ProgressFn | None = None,
    ) -> SampleOutput:
        """Sample ``num_samples`` continuations; ``progress`` gets prefill/decode reports."""
        base, adapter, default_generator = self._source(source)
        tokens, stop = sampler.check_request(
            prompt_tokens, num_samples, params, base.info, base.tokenizer is not None
        )
        generator = default_generator
        if params.seed is not None:
            generator = torch.Generator(self._device)
            generator.manual_seed(params.seed)
        decode: Callable[[list[int]], str] | None = None
        if base.tokenizer is not None:
            decode = partial(base.tokenizer.decode, skip_special_tokens=False)
        deadline = time.monotonic() + self.config.sample_timeout_s
        with self._weights(base, adapter) as model:
            return sampler.generate(
                model,
                base.cache_kwarg,
                tokens,
                num_samples,
                params,
                stop,
                decode=decode,
                generator=generator,
                deadline=deadline,
                want_prompt_logprobs=prompt_logprobs,
                chunk_elements=self.config.logprob_chunk_elements,
                progress=progress,
            )

    def compute_logprobs(self, source: SampleSource, tokens: Sequence[int]) -> list[float | None]:
        base, adapter, _ = self._source(source)
        ids = token_array(tokens, base.info.vocab_size, "tokens").tolist()
        check_length(len(ids), base.info.max_context, "tokens")
        with self._weights(base, adapter) as model:
            return sampler.sequence_logprobs(
                model, ids, self._device, self.config.logprob_chunk_elements
            )

    # ------------------------------------------------------------------ checkpoints

    def save_state(self, run_id: str, name: str) -> CheckpointInfo:
        run = self._run(run_id)
        assert run.base.peft is not None
        return checkpoints.save(self._ckpt_dir, run, run.base.peft, name, "state")

    def save_weights_for_sampler(self, run_id: str, name: str) -> CheckpointInfo:
        run = self._run(run_id)
        assert run.base.peft is not None
        return checkpoints.save(self._ckpt_dir, run, run.base.peft, name, "sampler")

    def load_state(self, run_id: str, path: str, optimizer: bool = True) -> RunInfo:
        """Load adapter weights (and optimizer state, step, RNG) from a checkpoint."""
        run = self._run(run_id)
        directory, meta = checkpoints.resolve_existing(self._ckpt_dir, path)
        checkpoints.check_kind(meta, optimizer)
        checkpoints.check_compatible(run, meta)
        tensors = checkpoints.load_adapter_tensors(directory, dict(run.params))
        fresh = make_optimizer(list(run.params.values()), self._device)
        state = None
        if optimizer:
            state = checkpoints.optimizer_state_dict(directory, run, fresh.state_dict())
        # Everything is validated: now change the run.
        with torch.no_grad():
            for name, param in run.params.items():
                param.copy_(tensors[name])
                param.grad = None
        if state is not None:
            fresh.load_state_dict(state)
            checkpoints.restore_rng(run, meta)
        run.optimizer = fresh
        run.step = int(meta["step"])
        run.tokens_trained = int(meta.get("tokens_trained", 0))
        return run.info()

    def list_checkpoints(self, run_id: str | None = None) -> list[CheckpointInfo]:
        return checkpoints.list_all(self._ckpt_dir, run_id)

    def delete_checkpoint(self, path: str) -> None:
        directory = checkpoints.delete(self._ckpt_dir, path)
        cached = self._samplers.pop(str(directory), None)
        if cached is not None:
            self._remove_adapter(cached.base, cached.adapter)

    # ------------------------------------------------------------------ memory

    def memory_stats(self) -> dict[str, int]:
        stats = {
            "base_params_bytes": sum(b.param_bytes for b in self.models.bases.values()),
            "num_runs": len(self._runs),
            "adapter_bytes": sum(r.adapter_bytes() for r in self._runs.values()),
            "optimizer_bytes": sum(r.optimizer_bytes() for r in self._runs.values()),
            "sampler_adapters": len(self._samplers),
        }
        for run_id, run in self._runs.items():
            stats[f"run.{run_id}.adapter_bytes"] = run.adapter_bytes()
            stats[f"run.{run_id}.optimizer_bytes"] = run.optimizer_bytes()
        if self._device.type == "cuda":
            stats["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self._device)
            stats["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self._device)
            stats["cuda_reserved_bytes"] = torch.cuda.memory_reserved(self._device)
        return stats

    # ------------------------------------------------------------------ internals

    @property
    def _ckpt_dir(self) -> Path:
        return Path(self.config.checkpoints_dir)

    def _run(self, run_id: str) -> RunState:
        try:
            return self._runs[run_id]
        except (KeyError, TypeError):
            raise UnknownRun(f"unknown run {run_id!r}", errors={"run_id": [str(run_id)]}) from None

    def _add_adapter(self, base: LoadedBase, prefix: str, spec: LoraSpec, seed: int) -> str:
        name = f"{prefix}{next(self._names)}"
        config = adapters.lora_config(base.targets, spec, base.source)
        base.peft = adapters.add_adapter(base.model, base.peft, name, config, seed)
        base.adapters.add(name)
        base.active = None
        return name

    def _remove_adapter(self, base: LoadedBase, name: str) -> None:
        base.adapters.discard(name)
        base.active = None
        if base.peft is None:
            return
        unwrapped = adapters.remove_adapter(base.peft, name)
        if unwrapped is not None:
            base.model, base.peft = unwrapped, None

    @contextmanager
    def _weights(self, base: LoadedBase, adapter: str | None) -> Generator[nn.Module, None, None]:
        """The module to call with exactly ``adapter`` active (None: the plain base)."""
        with self._matmul_precision(), self._active(base, adapter) as model:
            yield model

    @contextmanager
    def _matmul_precision(self) -> Generator[None, None, None]:
        """TF32 for the float32 adapter matmuls while an op runs, if the base is bf16/fp16.

        Their inputs are already bf16/fp16 activations, so TF32 only rounds the adapter
        weights inside the product; master weights, gradients and AdamW stay float32. The
        process-wide setting is restored when the op ends.
        """
        if not self._tf32:
            yield
            return
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)

    @contextmanager
    def _active(self, base: LoadedBase, adapter: str | None) -> Generator[nn.Module, None, None]:
        if adapter is not None:
            assert base.peft is not None
            if base.active != adapter:
                adapters.activate(base.peft, adapter)
                base.active = adapter
            yield base.peft
        elif base.peft is None:
            yield base.model
        else:
            with base.peft.disable_adapter():
                yield base.peft

    def _source(self, source: SampleSource) -> tuple[LoadedBase, str | None, torch.Generator]:
        given = [v for v in (source.base_model, source.run_id, source.checkpoint) if v is not None]
        if len(given) != 1:
            raise InvalidRequest(
                "set exactly one of base_model, run_id, checkpoint",
                errors={"source": ["exactly one field must be set"]},
            )
        if source.run_id is not None:
            run = self._run(source.run_id)
            return run.base, run.adapter, run.generator
        if source.base_model is not None:
            return self.models.get(source.base_model), None, self._generator
        assert source.checkpoint is not None
        cached = self._checkpoint_adapter(source.checkpoint)
        return cached.base, cached.adapter, self._generator

    def _checkpoint_adapter(self, path: str) -> _SamplerAdapter:
        """Load a saved checkpoint as an extra adapter (LRU of ``max_sampler_adapters``)."""
        directory, meta = checkpoints.resolve_existing(self._ckpt_dir, path)
        key, version = str(directory), float(meta["created_at"])
        cached = self._samplers.get(key)
        if cached is not None and cached.version == version:
            self._samplers.move_to_end(key)
            return cached
        if cached is not None:
            del self._samplers[key]
            self._remove_adapter(cached.base, cached.adapter)
        base = self.models.get(str(meta["base_model"]))
        name = self._add_adapter(base, "s", checkpoints.lora_spec(meta), seed=0)
        try:
            assert base.peft is not None
            params = adapters.adapter_parameters(base.peft, name)
            tensors = checkpoints.load_adapter_tensors(directory, dict(params))
            with torch.no_grad():
                for key_name, param in params.items():
                    param.copy_(tensors[key_name])
                    param.requires_grad_(False)
        except BaseException:
            self._remove_adapter(base, name)
            raise
        self._samplers[key] = _SamplerAdapter(base, name, version)
        while len(self._samplers) > max(1, self.config.max_sampler_adapters):
            _, evicted = self._samplers.popitem(last=False)
            self._remove_adapter(evicted.base, evicted.adapter)
        return self._samplers[key]
