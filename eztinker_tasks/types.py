"""Typed values that travel between the layers (web -> tasks -> engine and back).

Frozen dataclasses, torch-free, with ``to_dict`` / ``from_dict`` for the JSON that crosses the
Celery boundary. Tensors never appear here: the engine converts at its edge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

StopReason = Literal["stop", "length"]
CheckpointKind = Literal["state", "sampler"]


@dataclass(frozen=True)
class LoraSpec:
    """How a run's LoRA adapter is shaped. ``alpha=None`` means alpha = 32 (Tinker's default)."""

    rank: int = 32
    alpha: float | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraSpec:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Datum:
    """One training example: input tokens plus per-position loss inputs.

    ``loss_fn_inputs`` always has ``target_tokens`` (ints, same length as ``tokens``: position i
    predicts ``target_tokens[i]``) and usually ``weights`` (floats, any sign); RL losses add
    ``logprobs`` and ``advantages``. Every value is a flat list as long as ``tokens``.
    """

    tokens: tuple[int, ...]
    loss_fn_inputs: Mapping[str, Sequence[float]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": list(self.tokens),
            "loss_fn_inputs": {k: list(v) for k, v in self.loss_fn_inputs.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Datum:
        return cls(
            tokens=tuple(int(t) for t in data["tokens"]),
            loss_fn_inputs={k: list(v) for k, v in data["loss_fn_inputs"].items()},
        )


@dataclass(frozen=True)
class AdamParams:
    """AdamW hyper-parameters for one ``optim_step`` (decoupled weight decay)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0 means no clipping

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdamParams:
        return cls(**{k: float(data[k]) for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class CallSpec:
    """One ``forward_backward`` (``backward``) or ``forward`` call of a run, for ``run_calls``."""

    run_id: str
    data: Sequence[Datum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: Mapping[str, Any] | None = None
    backward: bool = True


@dataclass(frozen=True)
class ForwardBackwardOutput:
    """Per-datum outputs (``logprobs`` and ``elementwise_loss`` lists) and summed metrics.

    Metric keys have the form ``name:reduction``; ``loss:sum`` is always present.
    """

    loss_fn_outputs: list[dict[str, list[float]]]
    metrics: dict[str, float]
    # The pass it ran in: runs, calls, tokens, sequences (runs > 1: shared with other runs).
    batch: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"loss_fn_outputs": self.loss_fn_outputs, "metrics": self.metrics}
        if self.batch is not None:
            out["batch"] = self.batch
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ForwardBackwardOutput:
        return cls(list(data["loss_fn_outputs"]), dict(data["metrics"]))


@dataclass(frozen=True)
class OptimStepOutput:
    """Metrics of one optimizer step: at least ``step`` and ``grad_norm`` (before clipping)."""

    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics}


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``stop=None`` stops at EOS; ``stop=()`` never stops early.

    ``stop`` holds strings and/or token ids; with a non-empty ``stop`` EOS still stops.
    ``temperature=0`` is greedy. ``top_k=-1`` and ``top_p=1`` disable those filters.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str | int, ...] | None = None
    seed: int | None = None
    top_logprobs: int = 0  # also return the k most likely tokens' logprobs at each position

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = None if self.stop is None else list(self.stop)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        kw = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if kw.get("stop") is not None:
            kw["stop"] = tuple(kw["stop"])
        return cls(**kw)


@dataclass(frozen=True)
class SampleSource:
    """Where sampling weights come from: exactly one of the three fields is set."""

    base_model: str | None = None
    run_id: str | None = None
    checkpoint: str | None = None  # a checkpoint path as returned by save ("<run_id>/<name>")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SampleSource:
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class SampledSequence:
    """Generated tokens (not the prompt), one logprob per token, and why generation stopped."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: StopReason
    # With ``SamplingParams.top_logprobs`` k > 0: per token, the k most likely [token id,
    # logprob] pairs (most likely first) of the distribution its logprob comes from.
    top_logprobs: list[list[tuple[int, float]]] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.top_logprobs is None:
            del d["top_logprobs"]
        else:
            d["top_logprobs"] = [[list(pair) for pair in top] for top in self.top_logprobs]
        return d


@dataclass(frozen=True)
class SampleOutput:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "sequences": [s.to_dict() for s in self.sequences],
            "prompt_logprobs": self.prompt_logprobs,
        }


OpPhase = Literal["prefill", "decode", "forward", "backward"]


@dataclass(frozen=True)
class OpProgress:
    """Where a running engine operation is (what a progress callback receives).

    - ``prefill``: the prompt's forward pass; ``tokens_total`` = prompt tokens.
    - ``decode``: ``tokens_done`` of ``tokens_total`` (= max_tokens) generated per sequence;
      ``sequences`` in the batch, ``sequences_finished`` of them stopped (counted when reported).
    - ``forward`` / ``backward``: the loss pass; ``tokens_total`` = tokens in the batch,
      ``sequences`` = datums in it (no finer progress inside one pass).
    """

    phase: OpPhase
    tokens_done: int | None = None
    tokens_total: int | None = None
    sequences: int | None = None
    sequences_finished: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressFn = Callable[[OpProgress], None]


@dataclass(frozen=True)
class TokenStep:
    """What one decode step of a request sampled, per row (sequence): ``tokens[i]`` is row
    i's token ``index`` (None: that row had already stopped), ``logprobs[i]`` its logprob and
    ``top_logprobs[i]`` its top-k [token id, logprob] pairs (None unless asked for)."""

    index: int
    tokens: list[int | None]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None] | None = None


# Receives each decode step of a streamed request as it is sampled; returns True when the
# consumer is gone, which ends the request (``RequestCancelled``). Plain Python, quick.
TokenSink = Callable[[TokenStep], bool]


@dataclass(frozen=True)
class SampleCall:
    """One sample request for ``Engine.sample_many`` (the arguments of ``Engine.sample``)."""

    source: SampleSource
    prompt_tokens: Sequence[int]
    num_samples: int
    params: SamplingParams
    prompt_logprobs: bool = False
    progress: ProgressFn | None = None
    sink: TokenSink | None = None  # streams the tokens as they are sampled


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint on disk. ``path`` is the portable reference ``"<run_id>/<name>"``."""

    run_id: str
    name: str
    kind: CheckpointKind
    path: str
    directory: str
    step: int
    base_model: str
    created_at: float
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckpointInfo:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    vocab_size: int
    max_context: int
    eos_token_id: int | None
    builtin: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelInfo:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class RunInfo:
    """What the engine knows about a live run."""

    run_id: str
    base_model: str
    lora: LoraSpec
    step: int
    tokens_trained: int
    last_loss: float | None
    trainable_params: int
    adapter_bytes: int
    optimizer_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora"] = self.lora.to_dict()
        return d
