"""Schemas of the sampling resource: ``POST /v1/sample`` and ``POST /v1/compute_logprobs``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, validate

from eztinker_tasks.types import SampleSource, SamplingParams
from eztinker_web.fields import FiniteFloat, IntList, JsonBoolean, JsonInteger


class StopField(fields.Field):
    """A string, a token id, or a list of strings and token ids."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> tuple:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (str, int)):
                raise ValidationError("stop entries must be strings or token ids")
            if isinstance(item, str) and not item:
                raise ValidationError("stop strings must not be empty")
        return tuple(items)


class SourceFields(Schema):
    base_model = fields.String(load_default=None, validate=validate.Length(min=1, max=256))
    run_id = fields.String(load_default=None, validate=validate.Length(min=1, max=128))
    checkpoint = fields.String(
        load_default=None,
        validate=validate.Length(min=1, max=300),
        metadata={"description": "A sampler or state checkpoint path '<run_id>/<name>'"},
    )
    model_path = fields.String(
        load_default=None, metadata={"description": "Alias of checkpoint (Tinker's name)"}
    )


def _source(data: dict[str, Any]) -> SampleSource:
    checkpoint = data.pop("checkpoint")
    alias = data.pop("model_path")
    if checkpoint and alias and checkpoint != alias:
        raise ValidationError("give checkpoint or model_path, not both")
    checkpoint = checkpoint or alias
    given = [
        k
        for k, v in (
            ("base_model", data["base_model"]),
            ("run_id", data["run_id"]),
            ("checkpoint", checkpoint),
        )
        if v
    ]
    if len(given) > 1:
        raise ValidationError(f"give at most one of base_model, run_id, checkpoint (got {given})")
    return SampleSource(
        base_model=data.pop("base_model"), run_id=data.pop("run_id"), checkpoint=checkpoint
    )


@dataclass(frozen=True)
class SampleRequest:
    source: SampleSource
    prompt_text: str | None
    prompt_tokens: tuple[int, ...] | None
    num_samples: int
    params: SamplingParams
    prompt_logprobs: bool


SAMPLE_EXAMPLE = {"prompt": "The river", "max_tokens": 12, "stop": ["."], "temperature": 0}


class SampleSchema(SourceFields):
    prompt = fields.String(load_default=None, metadata={"description": "Prompt text"})
    prompt_tokens = IntList(load_default=None, metadata={"description": "Prompt token ids"})
    num_samples = JsonInteger(load_default=1, validate=validate.Range(min=1))
    max_new_tokens = JsonInteger(load_default=None, validate=validate.Range(min=1))
    max_tokens = JsonInteger(load_default=None, validate=validate.Range(min=1))
    temperature = FiniteFloat(load_default=1.0, validate=validate.Range(min=0.0))
    top_p = FiniteFloat(
        load_default=1.0, validate=validate.Range(min=0.0, max=1.0, min_inclusive=False)
    )
    top_k = JsonInteger(load_default=-1)
    stop = StopField(load_default=None, allow_none=True)
    seed = JsonInteger(load_default=None, allow_none=True)
    prompt_logprobs = JsonBoolean(load_default=False)

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> SampleRequest:
        source = _source(data)
        if (data["prompt"] is None) == (data["prompt_tokens"] is None):
            raise ValidationError("give exactly one of 'prompt' (text) or 'prompt_tokens'")
        if data["prompt_tokens"] is not None and not data["prompt_tokens"]:
            raise ValidationError({"prompt_tokens": ["must not be empty"]})
        if data["prompt"] is not None and not data["prompt"]:
            raise ValidationError({"prompt": ["must not be empty"]})
        a, b = data["max_new_tokens"], data["max_tokens"]
        if a is not None and b is not None and a != b:
            raise ValidationError("max_new_tokens and max_tokens disagree")
        top_k = data["top_k"]
        if top_k == 0 or top_k < -1:
            raise ValidationError({"top_k": ["must be -1 (off) or a positive integer"]})
        params = SamplingParams(
            max_tokens=a or b or 16,
            temperature=data["temperature"],
            top_p=data["top_p"],
            top_k=top_k,
            stop=data["stop"],
            seed=data["seed"],
        )
        tokens = data["prompt_tokens"]
        return SampleRequest(
            source,
            data["prompt"],
            tuple(tokens) if tokens is not None else None,
            data["num_samples"],
            params,
            data["prompt_logprobs"],
        )


@dataclass(frozen=True)
class LogprobsRequest:
    source: SampleSource
    tokens: tuple[int, ...]


LOGPROBS_EXAMPLE = {"base_model": "tiny-gpt2", "tokens": [281, 559, 311, 286, 1093]}


class ComputeLogprobsSchema(SourceFields):
    tokens = IntList(required=True, validate=validate.Length(min=1))

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> LogprobsRequest:
        return LogprobsRequest(_source(data), tuple(data["tokens"]))
