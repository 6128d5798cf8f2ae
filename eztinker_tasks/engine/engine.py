"""The ``Engine`` facade: the one object the tasks layer drives (see docs/ENGINE_SPEC.md).

It owns all GPU state of a worker: the loaded bases (``ModelRegistry``, each with the
multi-adapter LoRA layers injected once), the live runs (``RunState``: adapter + optimizer +
RNG) and an LRU of saved checkpoints loaded as extra adapters for sampling. Training and
``forward`` calls of one run or of MANY runs on one base run in one packed pass
(``passes.run_pass``): ``run_calls`` is the clock cycle. Each operation validates its whole
request first (typed errors from ``eztinker_tasks.errors``); one operation at a time; nothing
is shared across Engine instances.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eztinker_tasks import checkpoint_paths
from eztinker_tasks.engine import (
    adapters,
    checkpoint_listing,
    checkpoints,
    memory,
    sample_batches,
    sampler,
    training,
)
from eztinker_tasks.engine import calls as calls_mod
from eztinker_tasks.engine.batching import check_length, token_array
from eztinker_tasks.engine.checkpoint_adapters import CheckpointAdapters
from eztinker_tasks.engine.config import EngineConfig, resolve_device, resolve_dtype
from eztinker_tasks.engine.models import LoadedBase, ModelRegistry
from eztinker_tasks.engine.multilora import Adapter, LoraRoute, new_adapter
from eztinker_tasks.engine.passes import LossCall
from eztinker_tasks.engine.runs import RunState, checked_lora_spec, make_optimizer
from eztinker_tasks.errors import Conflict, EZTinkerError, InvalidRequest, UnknownRun
from eztinker_tasks.limits import check_adam_params
from eztinker_tasks.types import (
    AdamParams,
    CallSpec,
    CheckpointInfo,
    Datum,
    ForwardBackwardOutput,
    LoraSpec,
    ModelInfo,
    OptimStepOutput,
    ProgressFn,
    RunInfo,
    SampleCall,
    SampleOutput,
    SampleSource,
    SamplingParams,
)


class Engine:
    """LoRA training and sampling on shared, frozen base models (one worker's GPU state)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._device = resolve_device(config.device)
        self._dtype = resolve_dtype(config.dtype, self._device)
        self.models = ModelRegistry(
            Path(config.data_dir), self._device, self._dtype, Path(config.checkpoints_dir)
        )
        self._runs: dict[str, RunState] = {}
        self._samplers = CheckpointAdapters(
            self.models,
            self._new_adapter,
            Path(config.checkpoints_dir),
            config.max_sampler_adapters,
        )
        self._names = itertools.count()
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
        adapter = self._new_adapter(base, "r", spec, spec.seed)
        params = adapter.params
        generator = torch.Generator(self._device)
        generator.manual_seed(spec.seed)
        self._runs[run_id] = RunState(
            run_id=run_id,
            base=base,
            adapter=adapter,
            lora=spec,
            params=params,
            optimizer=make_optimizer(adapter.leaves, self._device),
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

    def peers(self, run_id: str) -> list[str]:
        """The other runs on the same base as ``run_id`` (they can share its passes)."""
        base = self._run(run_id).base
        return sorted(r for r, run in self._runs.items() if r != run_id and run.base is base)

    def run_info(self, run_id: str) -> RunInfo:
        return self._run(run_id).info()

    def delete_run(self, run_id: str) -> None:
        run = self._run(run_id)
        del self._runs[run_id]
        run.optimizer.state.clear()
        run.params.clear()
        run.adapter.free()

    # ------------------------------------------------------------------ training

    def forward_backward(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
    ) -> ForwardBackwardOutput:
        """One packed forward+backward; gradients accumulate until ``optim_step``."""
        return self._calls_of_one_run(run_id, [data], loss_fn, loss_fn_config, backward=True)[0]

    def forward(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
    ) -> ForwardBackwardOutput:
        """Same outputs as ``forward_backward``; no gradient, no state change."""
        return self._calls_of_one_run(run_id, [data], loss_fn, loss_fn_config, backward=False)[0]

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
        return self._calls_of_one_run(
            run_id, groups, loss_fn, loss_fn_config, backward=backward, progress=progress
        )

    def run_calls(
        self, calls: Sequence[CallSpec], progress: ProgressFn | None = None
    ) -> list[ForwardBackwardOutput | EZTinkerError]:
        """The clock cycle: the calls of MANY runs, in as few packed passes as possible.

        Calls on the same base with the same direction (``backward`` or not) share one pass;
        a run's calls keep their order. Each call gets exactly what it would get alone: its
        outputs and metrics, and (``backward``) its gradient added to its run's. A call whose
        request is invalid, or whose loss or gradient is not finite, gets its error in its
        place and changes nothing; the others stand. ``progress`` is told each pass's
        ``forward`` / ``backward`` phases.
        """
        validated: list[LossCall | EZTinkerError] = []
        for spec in calls:
            try:
                validated.append(calls_mod.loss_call(self._run(spec.run_id), spec))
            except EZTinkerError as exc:
                validated.append(exc)
        return calls_mod.run_calls(
            validated,
            [spec.backward for spec in calls],
            chunk_elements=self.config.logprob_chunk_elements,
            checkpointing=self.config.activation_checkpointing,
            progress=progress,
        )

    def optim_step(self, run_id: str, params: AdamParams) -> OptimStepOutput:
        run = self._run(run_id)
        check_adam_params(params)
        return training.optim_step(run, params)

    def _calls_of_one_run(
        self,
        run_id: str,
        groups: Sequence[Sequence[Datum]],
        loss_fn: str,
        loss_fn_config: Mapping[str, Any] | None,
        *,
        backward: bool,
        progress: ProgressFn | None = None,
    ) -> list[ForwardBackwardOutput]:
        """Consecutive calls of one run in one pass; the first error raised, nothing applied."""
        run = self._run(run_id)
        if not groups or any(len(g) == 0 for g in groups):
            raise InvalidRequest("data must be a non-empty list of datums", errors={"data": []})
        specs = [CallSpec(run_id, g, loss_fn, loss_fn_config, backward) for g in groups]
        calls = [calls_mod.loss_call(run, spec) for spec in specs]  # all validated first
        return calls_mod.calls_of_one_run(
            calls,
            backward=backward,
            chunk_elements=self.config.logprob_chunk_elements,
            checkpointing=self.config.activation_checkpointing,
            progress=progress,
        )

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
        call = SampleCall(source, prompt_tokens, num_samples, params, prompt_logprobs, progress)
        [out] = self.sample_many([call])
        if isinstance(out, EZTinkerError):
            raise out
        return out

    def sample_many(
        self,
        calls: Sequence[SampleCall],
        *,
        poll: Callable[[], Sequence[SampleCall]] | None = None,
        on_done: Callable[[int, SampleOutput | EZTinkerError], None] | None = None,
    ) -> list[SampleOutput | EZTinkerError]:
        """Sample many requests together: one decode batch per base model (``engine.decode``).

        Requests on one base, from any mix of runs, checkpoints and the bare base, decode in
        one batch (split only where the KV cache would not fit); each gets exactly what it
        would get alone. ``poll`` is asked, while the first batch runs, for calls to join it
        at its next step (continuous batching); ``on_done(index, outcome)`` gets each
        request's outcome as soon as it ends. Returns one outcome per request (``calls``, then
        the joined ones in the order ``poll`` gave them): its ``SampleOutput``, or the
        ``EZTinkerError`` that request alone raised (bad input, unknown source, its KV cache
        too large for the device, its timeout). Other exceptions propagate.
        """
        return sample_batches.sample_many(
            self._source, calls, self.config, poll=poll, on_done=on_done
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
        return checkpoints.save(self._ckpt_dir, self._run(run_id), name, "state")

    def save_weights_for_sampler(self, run_id: str, name: str) -> CheckpointInfo:
        return checkpoints.save(self._ckpt_dir, self._run(run_id), name, "sampler")

    def load_state(self, run_id: str, path: str, optimizer: bool = True) -> RunInfo:
        """Load adapter weights (and optimizer state, step, RNG) from a checkpoint."""
        run = self._run(run_id)
        directory, meta = checkpoints.resolve_existing(self._ckpt_dir, path)
        return checkpoints.load_into(run, directory, meta, optimizer, self._device)

    def capture_state(self, run_id: str) -> checkpoints.Captured:
        """The run's full state (adapter, optimizer, step, counters, RNG) copied aside on its
        device, as a state checkpoint to write later from any thread (``Captured.write``)."""
        return checkpoints.capture(self._run(run_id), "state", "snapshot")

    def restore_run(self, run_id: str, directory: Path) -> RunInfo:
        """Build run ``run_id`` from the state checkpoint in ``directory`` (an absolute path:
        a snapshot), exactly as it was: weights, optimizer, step, counters, RNG.

        Raises CheckpointNotFound if ``directory`` holds no complete state checkpoint, and
        Conflict if the run exists already.
        """
        checkpoint_paths.validate_name(run_id, "run_id")
        if run_id in self._runs:
            raise Conflict(f"run {run_id!r} already exists", errors={"run_id": [run_id]})
        meta = checkpoints.read_meta(directory)
        self.create_run(run_id, str(meta["base_model"]), checkpoints.lora_spec(meta))
        try:
            run = self._runs[run_id]
            return checkpoints.load_into(run, directory, meta, True, self._device)
        except BaseException:
            self.delete_run(run_id)
            raise

    def list_checkpoints(self, run_id: str | None = None) -> list[CheckpointInfo]:
        return checkpoint_listing.list_all(self._ckpt_dir, run_id)

    def delete_checkpoint(self, path: str) -> None:
        self._samplers.forget(checkpoint_listing.delete(self._ckpt_dir, path))

    # ------------------------------------------------------------------ memory

    def memory_stats(self) -> dict[str, int]:
        """Bytes: base params, per-run adapter and optimizer, samplers, CUDA allocations."""
        return memory.engine_stats(
            self.models.bases.values(), self._runs, len(self._samplers), self._device
        )

    # ------------------------------------------------------------------ internals

    @property
    def _ckpt_dir(self) -> Path:
        return Path(self.config.checkpoints_dir)

    def _run(self, run_id: str) -> RunState:
        try:
            return self._runs[run_id]
        except (KeyError, TypeError):
            raise UnknownRun(f"unknown run {run_id!r}", errors={"run_id": [str(run_id)]}) from None

    def _new_adapter(self, base: LoadedBase, prefix: str, spec: LoraSpec, seed: int) -> Adapter:
        paths = adapters.target_modules(base.targets, spec)
        alpha = adapters.DEFAULT_ALPHA if spec.alpha is None else float(spec.alpha)
        name = f"{prefix}{next(self._names)}"
        return new_adapter(base.model, name, paths, spec.rank, alpha, seed, self._device)

    @contextmanager
    def _weights(
        self, base: LoadedBase, adapter: Adapter | None
    ) -> Generator[nn.Module, None, None]:
        """The module to call with every row through ``adapter`` (None: the plain base)."""
        base.context.route = None if adapter is None else LoraRoute.single(adapter, self._dtype)
        try:
            yield base.model
        finally:
            base.context.route = None

    def _source(self, source: SampleSource) -> tuple[LoadedBase, Adapter | None, torch.Generator]:
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
        cached = self._samplers.get(source.checkpoint)
        return cached.base, cached.adapter, self._generator
