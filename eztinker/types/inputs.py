"""What a training loop sends: ``Datum``, ``ModelInput``, ``TensorData``, ``AdamParams``,
``SamplingParams`` (re-exported by ``eztinker.types``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeAlias

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
