"""The backend interface the tasks layer codes against (docs/ENGINE_SPEC.md), as a Protocol.

``Engine`` (own multi-adapter LoRA layers on shared transformers models) implements it; another
backend can replace it by providing the same methods, without touching the tasks or web layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from eztinker_tasks.engine.checkpoints import Captured
from eztinker_tasks.errors import EZTinkerError
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


class Backend(Protocol):
    @property
    def device(self) -> str: ...

    def list_models(self) -> list[ModelInfo]: ...
    def model_info(self, base_model: str) -> ModelInfo: ...

    def create_run(self, run_id: str, base_model: str, lora: LoraSpec) -> RunInfo: ...
    def create_run_from_checkpoint(
        self, run_id: str, path: str, optimizer: bool = True
    ) -> RunInfo: ...
    def has_run(self, run_id: str) -> bool: ...
    def list_runs(self) -> list[str]: ...
    def run_info(self, run_id: str) -> RunInfo: ...
    def peers(self, run_id: str) -> list[str]: ...
    def delete_run(self, run_id: str) -> None: ...

    def forward_backward(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
    ) -> ForwardBackwardOutput: ...
    def forward(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
    ) -> ForwardBackwardOutput: ...
    def forward_backward_many(
        self,
        run_id: str,
        groups: Sequence[Sequence[Datum]],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        backward: bool = True,
        progress: ProgressFn | None = None,
    ) -> list[ForwardBackwardOutput]: ...
    def run_calls(
        self, calls: Sequence[CallSpec], progress: ProgressFn | None = None
    ) -> list[ForwardBackwardOutput | EZTinkerError]: ...
    def optim_step(self, run_id: str, params: AdamParams) -> OptimStepOutput: ...

    def sample(
        self,
        source: SampleSource,
        prompt_tokens: Sequence[int],
        num_samples: int,
        params: SamplingParams,
        prompt_logprobs: bool = False,
        progress: ProgressFn | None = None,
    ) -> SampleOutput: ...
    def sample_many(
        self,
        calls: Sequence[SampleCall],
        *,
        poll: Callable[[], Sequence[SampleCall]] | None = None,
        on_done: Callable[[int, SampleOutput | EZTinkerError], None] | None = None,
    ) -> list[SampleOutput | EZTinkerError]: ...
    def compute_logprobs(
        self, source: SampleSource, tokens: Sequence[int]
    ) -> list[float | None]: ...

    def save_state(self, run_id: str, name: str) -> CheckpointInfo: ...
    def save_weights_for_sampler(self, run_id: str, name: str) -> CheckpointInfo: ...
    def load_state(self, run_id: str, path: str, optimizer: bool = True) -> RunInfo: ...
    def capture_state(self, run_id: str) -> Captured: ...
    def restore_run(self, run_id: str, directory: Path) -> RunInfo: ...
    def list_checkpoints(self, run_id: str | None = None) -> list[CheckpointInfo]: ...
    def delete_checkpoint(self, path: str) -> None: ...

    def memory_stats(self) -> dict[str, int]: ...
