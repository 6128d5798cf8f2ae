"""The values a training loop sends and receives, named as in the Tinker SDK.

``from eztinker import types`` gives the same names as ``from tinker import types``:
``Datum``, ``ModelInput``, ``TensorData``, ``AdamParams``, ``SamplingParams``, ``SampleResponse``
and the rest. Each has ``to_json`` (what goes over HTTP) or ``from_json`` (what comes back).
Wherever a tensor is expected, a ``TensorData``, a numpy array, a torch tensor (duck-typed: torch
is never imported here) or a plain list is accepted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Protocol, Self, TypeAlias

import numpy as np

DType = Literal["int64", "float32"]
StopReason = Literal["stop", "length"]
CheckpointKind = Literal["state", "sampler"]
LossFnType = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"]


class TorchLike(Protocol):
    """What the client needs of a torch tensor (torch itself is never imported here)."""

    dtype: Any

    def detach(self) -> Any: ...

    def cpu(self) -> Any: ...


TensorLike: TypeAlias = "TensorData | np.ndarray | Sequence[int] | Sequence[float] | TorchLike"


def _is_torch_tensor(value: Any) -> bool:
    return hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "dtype")


# -- tensors ---------------------------------------------------------------------------------
@dataclass
class TensorData:
    """A flat list of numbers with a dtype and a shape (Tinker's ``TensorData``)."""

    data: list[int] | list[float]
    dtype: DType = "float32"
    shape: list[int] | None = None

    @classmethod
    def from_numpy(cls, array: Any) -> TensorData:
        arr = np.asarray(array)
        dtype: DType = "int64" if np.issubdtype(arr.dtype, np.integer) else "float32"
        return cls(arr.reshape(-1).tolist(), dtype, list(arr.shape))

    @classmethod
    def from_torch(cls, tensor: Any) -> TensorData:
        """From a torch tensor, without importing torch (works for bfloat16 too)."""
        t = tensor.detach().cpu()
        dtype: DType = "int64" if "int" in str(t.dtype) else "float32"
        return cls(t.reshape(-1).tolist(), dtype, list(t.shape))

    @classmethod
    def from_list(cls, values: Iterable[Any]) -> TensorData:
        items = list(values)
        if all(isinstance(x, int | np.integer) and not isinstance(x, bool) for x in items):
            return cls([int(x) for x in items], "int64", [len(items)])
        return cls.from_numpy(np.asarray(items, dtype=np.float32))

    @classmethod
    def coerce(cls, value: TensorLike | Mapping[str, Any]) -> TensorData:
        """A ``TensorData`` from a TensorData, numpy array, torch tensor or list of numbers."""
        if isinstance(value, TensorData):
            return value
        if isinstance(value, np.ndarray):
            return cls.from_numpy(value)
        if _is_torch_tensor(value):
            return cls.from_torch(value)
        if isinstance(value, Mapping) and "data" in value:
            return cls(list(value["data"]), value.get("dtype", "float32"), value.get("shape"))
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            raise TypeError(
                f"expected a list, numpy array, torch tensor or TensorData, got {type(value)!r}"
            )
        return cls.from_list(value)

    def to_numpy(self) -> np.ndarray:
        arr = np.asarray(self.data, dtype=np.int64 if self.dtype == "int64" else np.float32)
        return arr.reshape(self.shape) if self.shape is not None else arr

    def to_torch(self) -> Any:
        """A torch tensor (imports torch: install it yourself, the client does not need it)."""
        import torch

        return torch.from_numpy(self.to_numpy())

    def tolist(self) -> list[Any]:
        if self.shape is None or len(self.shape) <= 1:
            return list(self.data)
        return self.to_numpy().tolist()

    def to_json(self) -> list[int] | list[float]:
        return list(self.data)

    def __len__(self) -> int:
        return len(self.data)


# -- inputs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncodedTextChunk:
    """A run of token ids."""

    tokens: Sequence[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class ModelInput:
    """The tokens a model reads, as a list of chunks (Tinker's ``ModelInput``)."""

    chunks: list[EncodedTextChunk] = field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: Iterable[int]) -> ModelInput:
        return cls([EncodedTextChunk([int(t) for t in tokens])])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls([])

    def to_ints(self) -> list[int]:
        return [int(t) for chunk in self.chunks for t in chunk.tokens]

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: EncodedTextChunk) -> ModelInput:
        """A new ModelInput with ``chunk`` at the end."""
        return ModelInput([*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        """A new ModelInput with one more token at the end."""
        return self.append(EncodedTextChunk([int(token)]))

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.to_ints()}


class Datum:
    """One training example: a model input plus per-position loss inputs.

    ``loss_fn_inputs`` holds ``target_tokens`` (position i predicts ``target_tokens[i]``), usually
    ``weights``, and for RL losses ``logprobs`` and ``advantages``; each value is as long as the
    input and may be a TensorData, numpy array, torch tensor or list (stored as TensorData).
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData]

    def __init__(
        self,
        model_input: ModelInput | Sequence[int],
        loss_fn_inputs: Mapping[str, TensorLike],
    ) -> None:
        if not isinstance(model_input, ModelInput):
            model_input = ModelInput.from_ints(model_input)
        self.model_input = model_input
        self.loss_fn_inputs = {k: TensorData.coerce(v) for k, v in loss_fn_inputs.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "model_input": self.model_input.to_json(),
            "loss_fn_inputs": {k: v.to_json() for k, v in self.loss_fn_inputs.items()},
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Datum) and self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        inputs = ", ".join(f"{k}[{len(v)}]" for k, v in self.loss_fn_inputs.items())
        return f"Datum(model_input=<{self.model_input.length} tokens>, loss_fn_inputs={{{inputs}}})"


@dataclass(frozen=True)
class AdamParams:
    """AdamW hyper-parameters for one ``optim_step``. ``grad_clip_norm=0`` means no clipping."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def to_json(self) -> dict[str, float]:
        return {
            "learning_rate": float(self.learning_rate),
            "beta1": float(self.beta1),
            "beta2": float(self.beta2),
            "eps": float(self.eps),
            "weight_decay": float(self.weight_decay),
            "grad_clip_norm": float(self.grad_clip_norm),
        }


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``max_tokens=None`` uses the server's default (16); ``temperature=0`` is
    greedy; ``top_k=-1`` and ``top_p=1`` disable those filters; ``stop`` holds strings and/or
    token ids (EOS always stops)."""

    max_tokens: int | None = None
    seed: int | None = None
    stop: str | int | Sequence[str | int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "temperature": float(self.temperature),
            "top_k": int(self.top_k),
            "top_p": float(self.top_p),
        }
        if self.max_tokens is not None:
            body["max_tokens"] = int(self.max_tokens)
        if self.seed is not None:
            body["seed"] = int(self.seed)
        if self.stop is not None:
            body["stop"] = self.stop if isinstance(self.stop, str | int) else list(self.stop)
        return body


# -- outputs ---------------------------------------------------------------------------------
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

__all__ = [
    "AdamParams",
    "Checkpoint",
    "CheckpointKind",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "GetServerCapabilitiesResponse",
    "LoadWeightsResponse",
    "LoraConfig",
    "LossFnOutput",
    "LossFnType",
    "ModelInfo",
    "ModelInput",
    "OptimStepResponse",
    "RunInfo",
    "SampleResponse",
    "SampledSequence",
    "SamplingParams",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "ServerCapabilities",
    "StopReason",
    "SupportedModel",
    "TensorData",
    "TensorLike",
]
