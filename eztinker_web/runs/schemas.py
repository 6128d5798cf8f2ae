"""Request and response schemas of the runs resource (runs and their training operations).

Each request schema turns JSON into a frozen dataclass (``@post_load``); views never see raw
dicts. Both the Tinker datum form and the seed's ``{input_ids, target_ids}`` form are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, validate, validates_schema

from eztinker_tasks.loss_specs import bounds_message, first_out_of_bounds
from eztinker_tasks.types import AdamParams, Datum, LoraSpec
from eztinker_web.checkpoints.schemas import CheckpointSchema
from eztinker_web.fields import FiniteFloat, IntList, JsonBoolean, JsonInteger, TensorField

MAX_SEQ_ID = 10**12  # Redis' Lua and cjson keep integers exact well beyond this

SEQ_ID = JsonInteger(
    validate=validate.Range(min=1, max=MAX_SEQ_ID),
    load_default=None,
    metadata={
        "description": "Per-run operation number (above the run's latest); resubmitting it "
        "returns the same future"
    },
)


# -- create ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CreateRunRequest:
    base_model: str | None
    lora: LoraSpec
    from_state: str | None
    optimizer: bool


# What a run created from a state takes from that state (a request may not say otherwise).
SHAPE_KEYS = {"base_model", "rank", "alpha", "train_attn", "train_mlp", "train_unembed", "seed"}


CREATE_RUN_EXAMPLE = {"base_model": "tiny-gpt2", "rank": 8}


class CreateRunSchema(Schema):
    base_model = fields.String(
        load_default=None,
        validate=validate.Length(min=1, max=256),
        metadata={"description": "Model name or path; default EZTINKER_DEFAULT_MODEL"},
    )
    rank = JsonInteger(load_default=32, validate=validate.Range(min=1, max=1024))
    alpha = FiniteFloat(load_default=None, allow_none=True, validate=validate.Range(min=0.0))
    train_attn = JsonBoolean(load_default=True)
    train_mlp = JsonBoolean(load_default=True)
    train_unembed = JsonBoolean(load_default=True)
    seed = JsonInteger(load_default=None, allow_none=True)
    from_state = fields.String(
        load_default=None,
        metadata={"description": "Start from this checkpoint path ('<run_id>/<name>')"},
    )
    optimizer = JsonBoolean(
        load_default=True, metadata={"description": "With from_state: also load optimizer state"}
    )

    @validates_schema
    def _targets(self, data: dict[str, Any], **_: Any) -> None:
        if not (data["train_attn"] or data["train_mlp"] or data["train_unembed"]):
            raise ValidationError("at least one of train_attn/train_mlp/train_unembed is needed")

    @post_load(pass_original=True)
    def _make(self, data: dict[str, Any], original: Any, **_: Any) -> CreateRunRequest:
        given = sorted(set(original) & SHAPE_KEYS) if isinstance(original, dict) else []
        if data["from_state"] and given:
            raise ValidationError(
                {
                    key: ["from_state takes the base model and LoRA shape of the state"]
                    for key in given
                }
            )
        lora = LoraSpec(
            rank=data["rank"],
            alpha=data["alpha"],
            train_attn=data["train_attn"],
            train_mlp=data["train_mlp"],
            train_unembed=data["train_unembed"],
            seed=data["seed"],
        )
        return CreateRunRequest(data["base_model"], lora, data["from_state"], data["optimizer"])


class LoraSchema(Schema):
    rank = fields.Integer(required=True)
    alpha = fields.Float(required=True, allow_none=True)
    train_attn = fields.Boolean(required=True)
    train_mlp = fields.Boolean(required=True)
    train_unembed = fields.Boolean(required=True)
    seed = fields.Integer(required=True, allow_none=True)


class RunSchema(Schema):
    """A run as ``GET /v1/runs/<run_id>`` shows it (response only: ``required`` documents the
    fields always sent)."""

    run_id = fields.String(required=True)
    base_model = fields.String(required=True)
    lora = fields.Nested(LoraSchema, required=True)
    worker = fields.String(required=True)
    status = fields.String(
        required=True,
        metadata={"description": "creating | ready | recovering | failed | lost"},
    )
    created_at = fields.Float(required=True)
    step = fields.Integer(required=True)
    tokens_trained = fields.Integer(required=True)
    last_loss = fields.Float(required=True, allow_none=True)
    last_state = fields.String(required=True, allow_none=True)
    error = fields.String(required=True, allow_none=True)
    recoverable = fields.Boolean(
        required=True,
        metadata={"description": "Recovers by itself when its worker dies (snapshots + op log)"},
    )
    tenant = fields.String(required=True, metadata={"description": "The tenant that owns the run"})
    checkpoints = fields.List(fields.Nested(CheckpointSchema), required=True)
    last_seq_id = fields.Integer(
        required=True, metadata={"description": "Highest seq_id submitted to this run"}
    )


class CreatedRunSchema(RunSchema):
    """A new run, with the future of its creation."""

    future_id = fields.String(
        required=True, metadata={"description": "Poll GET /v1/futures/<future_id>"}
    )
    job_id = fields.String(
        required=True, metadata={"description": "Same as future_id (the seed's name)"}
    )


class RunListSchema(Schema):
    runs = fields.List(fields.Nested(RunSchema), required=True)


class SubmittedSchema(Schema):
    future_id = fields.String(
        required=True, metadata={"description": "Poll GET /v1/futures/<future_id>"}
    )
    job_id = fields.String(
        required=True, metadata={"description": "Same as future_id (the seed's name)"}
    )
    seq_id = fields.Integer(required=True, allow_none=True)
    run_id = fields.String(required=True, allow_none=True)


# -- forward / forward_backward ---------------------------------------------------------------
class ChunkSchema(Schema):
    type = fields.String(load_default="encoded_text", validate=validate.OneOf(["encoded_text"]))
    tokens = IntList(required=True)


class ModelInputSchema(Schema):
    tokens = IntList(load_default=None)
    chunks = fields.List(fields.Nested(ChunkSchema), load_default=None)

    @post_load
    def _tokens(self, data: dict[str, Any], **_: Any) -> list[int]:
        if (data["tokens"] is None) == (data["chunks"] is None):
            raise ValidationError("give exactly one of 'tokens' or 'chunks'")
        if data["tokens"] is not None:
            return data["tokens"]
        return [t for chunk in data["chunks"] for t in chunk["tokens"]]


class DatumSchema(Schema):
    model_input = fields.Nested(ModelInputSchema, required=True)
    loss_fn_inputs = fields.Dict(
        keys=fields.String(),
        values=TensorField(),
        required=True,
        metadata={"description": "target_tokens, weights, logprobs, advantages: per position"},
    )

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> Datum:
        tokens = data["model_input"]
        inputs = data["loss_fn_inputs"]
        if not tokens:
            raise ValidationError({"model_input": ["no tokens"]})
        targets = inputs.get("target_tokens")
        if targets is None:
            raise ValidationError({"loss_fn_inputs": ["target_tokens is required"]})
        if any(t != int(t) for t in targets):
            raise ValidationError({"loss_fn_inputs": ["target_tokens must be integers"]})
        for key, values in inputs.items():
            if len(values) != len(tokens):
                raise ValidationError(
                    {
                        "loss_fn_inputs": [
                            f"{key} has {len(values)} values for {len(tokens)} input tokens"
                        ]
                    }
                )
            if key != "target_tokens":
                bad = first_out_of_bounds(key, values)
                if bad is not None:
                    message = bounds_message(key, bad, values[bad])
                    raise ValidationError({"loss_fn_inputs": {key: [message]}})
        inputs = dict(inputs)
        inputs["target_tokens"] = [int(t) for t in targets]
        return Datum(tuple(tokens), inputs)


def _as_batch(value: list[Any]) -> list[list[int]]:
    if value and isinstance(value[0], list):
        return value
    return [value]


def _int_batch(value: Any, name: str) -> list[list[int]]:
    if not isinstance(value, list) or not value:
        raise ValidationError({name: ["must be a non-empty list of token ids (or of lists)"]})
    batch = _as_batch(value)
    for row in batch:
        if not isinstance(row, list) or not all(type(t) is int for t in row):
            raise ValidationError({name: ["must hold integers only"]})
    return batch


@dataclass(frozen=True)
class ForwardRequest:
    data: tuple[Datum, ...]
    loss_fn: str
    loss_fn_config: dict[str, float] | None
    seq_id: int | None


# A Tinker datum: position i of the input predicts target_tokens[i].
FORWARD_EXAMPLE = {
    "data": [
        {
            "model_input": {"tokens": [281, 559, 311, 286]},
            "loss_fn_inputs": {
                "target_tokens": [559, 311, 286, 1093],
                "weights": [1.0, 1.0, 1.0, 1.0],
            },
        }
    ],
    "loss_fn": "cross_entropy",
}


class ForwardBackwardSchema(Schema):
    data = fields.List(fields.Nested(DatumSchema), load_default=None)
    input_ids = fields.Raw(
        load_default=None,
        metadata={"description": "Seed form: token ids (or a list of them); HF labels shift"},
    )
    target_ids = fields.Raw(
        load_default=None,
        metadata={"description": "Seed form: labels aligned with input_ids; -100 is ignored"},
    )
    loss_fn = fields.String(load_default="cross_entropy")
    loss_fn_config = fields.Dict(
        keys=fields.String(), values=FiniteFloat(), load_default=None, allow_none=True
    )
    seq_id = SEQ_ID

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> ForwardRequest:
        has_data = data["data"] is not None
        has_seed = data["input_ids"] is not None or data["target_ids"] is not None
        if has_data == has_seed:
            raise ValidationError("give either 'data' (Tinker datums) or 'input_ids'/'target_ids'")
        if has_data:
            datums = tuple(data["data"])
        else:
            datums = tuple(_seed_datums(data["input_ids"], data["target_ids"]))
        if not datums:
            raise ValidationError({"data": ["empty batch: give at least one datum"]})
        return ForwardRequest(datums, data["loss_fn"], data["loss_fn_config"], data["seq_id"])


def _seed_datums(input_ids: Any, target_ids: Any) -> list[Datum]:
    """The seed's form follows the HF ``labels`` convention: the server shifts by one."""
    inputs = _int_batch(input_ids, "input_ids")
    targets = _int_batch(target_ids if target_ids is not None else input_ids, "target_ids")
    if len(inputs) != len(targets):
        raise ValidationError({"target_ids": ["must have as many sequences as input_ids"]})
    datums = []
    for i, (x, y) in enumerate(zip(inputs, targets, strict=True)):
        if len(x) != len(y):
            raise ValidationError(
                {"target_ids": [f"sequence {i}: {len(y)} labels for {len(x)} input ids"]}
            )
        if len(x) < 2:
            raise ValidationError({"input_ids": [f"sequence {i}: needs at least 2 tokens"]})
        labels = y[1:]
        weights = [0.0 if t == -100 else 1.0 for t in labels]
        datums.append(
            Datum(
                tuple(x[:-1]),
                {
                    "target_tokens": [0 if t == -100 else t for t in labels],
                    "weights": weights,
                },
            )
        )
    return datums


# -- optim_step ------------------------------------------------------------------------------
def _nonneg() -> validate.Range:
    return validate.Range(min=0.0)


class AdamParamsSchema(Schema):
    learning_rate = FiniteFloat(load_default=1e-4, validate=_nonneg())
    beta1 = FiniteFloat(
        load_default=0.9, validate=validate.Range(min=0.0, max=1.0, max_inclusive=False)
    )
    beta2 = FiniteFloat(
        load_default=0.95, validate=validate.Range(min=0.0, max=1.0, max_inclusive=False)
    )
    eps = FiniteFloat(load_default=1e-12, validate=validate.Range(min=0.0, min_inclusive=False))
    weight_decay = FiniteFloat(load_default=0.0, validate=_nonneg())
    grad_clip_norm = FiniteFloat(load_default=0.0, validate=_nonneg())


@dataclass(frozen=True)
class OptimStepRequest:
    adam: AdamParams
    seq_id: int | None


OPTIM_STEP_EXAMPLE = {"adam_params": {"learning_rate": 0.002, "weight_decay": 0.01}}


class OptimStepSchema(AdamParamsSchema):
    """Tinker's ``{adam_params: {...}}`` or the seed's flat ``{learning_rate, weight_decay}``.

    Which keys the body gave is read from ``original_data`` (this call's own input): a schema
    instance serves every request thread at once, so it must hold no per-request state.
    """

    adam_params = fields.Nested(AdamParamsSchema, load_default=None)
    seq_id = SEQ_ID

    @post_load(pass_original=True)
    def _make(self, data: dict[str, Any], original_data: Any, **_: Any) -> OptimStepRequest:
        nested = data.pop("adam_params")
        seq_id = data.pop("seq_id")
        if nested is not None:
            given = set(original_data) if isinstance(original_data, dict) else set()
            if given & set(AdamParamsSchema().fields):
                raise ValidationError("give adam_params or flat hyper-parameters, not both")
            return OptimStepRequest(AdamParams.from_dict(nested), seq_id)
        return OptimStepRequest(AdamParams.from_dict(data), seq_id)


# -- save / load -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SaveRequest:
    name: str
    kind: str
    seq_id: int | None


SAVE_EXAMPLE = {"name": "checkpoint_v1", "kind": "state"}


class SaveSchema(Schema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=128))
    kind = fields.String(load_default="state", validate=validate.OneOf(["state", "sampler"]))
    seq_id = SEQ_ID

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> SaveRequest:
        return SaveRequest(data["name"], data["kind"], data["seq_id"])


@dataclass(frozen=True)
class LoadRequest:
    path: str
    optimizer: bool
    seq_id: int | None


class LoadSchema(Schema):
    path = fields.String(required=True, validate=validate.Length(min=1, max=300))
    optimizer = JsonBoolean(load_default=True)
    seq_id = SEQ_ID

    @post_load
    def _make(self, data: dict[str, Any], **_: Any) -> LoadRequest:
        return LoadRequest(data["path"], data["optimizer"], data["seq_id"])
