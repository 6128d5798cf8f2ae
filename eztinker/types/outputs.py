"""What comes back: ``ForwardBackwardOutput``, ``SampleResponse``, ``Checkpoint``, ``RunInfo`` and
the rest (re-exported by ``eztinker.types``). Each has ``from_json``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Self

import numpy as np

from eztinker.types.inputs import CheckpointKind, StopReason, TensorData


def _pick(cls: Any, data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class ForwardBackwardOutput:
    """Per-datum outputs (dicts of TensorData: ``logprobs``, ``elementwise_loss``) and metrics.

    Metric keys read ``name:reduction``; ``loss:sum`` is the weighted loss summed over tokens.
    """

    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]
    loss_fn_output_type: str = "cross_entropy"
    # The engine pass the call ran in: ``runs``, ``calls``, ``tokens``, ``sequences`` (runs > 1:
    # it shared the pass with other runs' calls) and ``activation_checkpointing``.
    batch: dict[str, Any] | None = None
    # Milliseconds it waited in its queue (``queued_ms``) and ran (``run_ms``), from its future.
    timing: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any], loss_fn: str = "cross_entropy") -> Self:
        outputs = [
            {k: TensorData.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in out.items()}
            for out in data.get("loss_fn_outputs") or []
        ]
        batch = data.get("batch")
        return cls(
            outputs,
            dict(data.get("metrics") or {}),
            loss_fn,
            dict(batch) if isinstance(batch, Mapping) else None,
        )


@dataclass(frozen=True)
class OptimStepResponse:
    """Metrics of one optimizer step: ``step``, ``grad_norm``, ``learning_rate``."""

    metrics: dict[str, float] | None = None
    timing: dict[str, Any] | None = None  # queued_ms / run_ms, from its future

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OptimStepResponse:
        return cls(dict(data.get("metrics") or {}))


@dataclass(frozen=True)
class SampledSequence:
    """Generated tokens (not the prompt), one logprob per token, why it stopped, and its text."""

    tokens: list[int]
    logprobs: list[float] | None
    stop_reason: StopReason
    text: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SampledSequence:
        return cls(**_pick(cls, data))


@dataclass(frozen=True)
class SampleResponse:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    prompt_tokens: list[int] | None = None
    base_model: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SampleResponse:
        return cls(
            [SampledSequence.from_json(s) for s in data.get("sequences") or []],
            data.get("prompt_logprobs"),
            data.get("prompt_tokens"),
            data.get("base_model"),
        )


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint on the server. ``path`` (``"<run_id>/<name>"``) is what load/sample take."""

    path: str
    run_id: str = ""
    name: str = ""
    kind: CheckpointKind = "state"
    step: int = 0
    base_model: str = ""
    created_at: float = 0.0
    size_bytes: int = 0
    directory: str = ""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Checkpoint:
        return cls(**_pick(cls, data))


@dataclass(frozen=True)
class SaveWeightsResponse:
    """What ``save_state`` returns: the checkpoint's ``path`` and its details."""

    path: str
    checkpoint: Checkpoint | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(str(data["path"]), Checkpoint.from_json(data))


@dataclass(frozen=True)
class SaveWeightsForSamplerResponse(SaveWeightsResponse):
    """What ``save_weights_for_sampler`` returns."""


@dataclass(frozen=True)
class LoadWeightsResponse:
    """What ``load_state`` returns: the path loaded and the run's step after loading."""

    path: str
    step: int = 0


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 32
    alpha: float | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    seed: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> LoraConfig:
        return cls(**_pick(cls, data or {}))


@dataclass(frozen=True)
class RunInfo:
    """A run as the server reports it (``GET /v1/runs/<id>``)."""

    run_id: str
    base_model: str = ""
    lora: LoraConfig = field(default_factory=LoraConfig)
    worker: str = ""
    status: str = ""
    created_at: float = 0.0
    step: int = 0
    tokens_trained: int = 0
    last_loss: float | None = None
    last_state: str | None = None
    error: str | None = None
    checkpoints: list[Checkpoint] = field(default_factory=list)
    tenant: str = ""  # the tenant that owns the run (an admin key lists every tenant's)

    @property
    def model_id(self) -> str:
        return self.run_id

    @property
    def model_name(self) -> str:
        return self.base_model

    @property
    def lora_rank(self) -> int:
        return self.lora.rank

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunInfo:
        kw = _pick(cls, data)
        kw["lora"] = LoraConfig.from_json(data.get("lora"))
        kw["checkpoints"] = [Checkpoint.from_json(c) for c in data.get("checkpoints") or []]
        return cls(**kw)


@dataclass(frozen=True)
class ModelInfo:
    """A model the server can train or sample."""

    name: str
    architecture: str = ""
    vocab_size: int = 0
    max_context: int = 0
    eos_token_id: int | None = None
    builtin: bool = False
    description: str = ""

    @property
    def model_name(self) -> str:
        return self.name

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelInfo:
        return cls(**_pick(cls, data))


@dataclass(frozen=True)
class ServerCapabilities:
    supported_models: list[ModelInfo]
    default_model: str = ""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServerCapabilities:
        return cls(
            [ModelInfo.from_json(m) for m in data.get("models") or []],
            str(data.get("default_model") or ""),
        )


# Tinker's names for the same shapes.
GetInfoResponse = RunInfo
SupportedModel = ModelInfo
GetServerCapabilitiesResponse = ServerCapabilities
LossFnOutput = dict[str, TensorData]
