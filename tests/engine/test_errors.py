"""Every bad request raises a typed error naming the problem and leaves the run untouched."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from engine_helpers import (
    SENTENCE,
    datum,
    encode,
    grad_of,
    grads_copy,
    new_run,
    params_copy,
    run_state,
    sequence_datum,
    train,
)

from eztinker_tasks.engine import Engine
from eztinker_tasks.errors import (
    CheckpointNotFound,
    Conflict,
    EZTinkerError,
    InvalidRequest,
    UnknownModel,
    UnknownRun,
)
from eztinker_tasks.types import AdamParams, Datum, LoraSpec

GOOD = datum([5, 6, 7, 8], weights=[1.0, 1.0, 1.0, 1.0])


def _bad_forward_backward_requests() -> list[tuple[str, dict, type[EZTinkerError], str]]:
    return [
        ("token id too large", {"data": [datum([5, 2048, 7])]}, InvalidRequest, "vocabulary"),
        ("negative token id", {"data": [datum([5, -1, 7])]}, InvalidRequest, "vocabulary"),
        ("target id too large", {"data": [datum([5, 6], [6, 9999])]}, InvalidRequest, "target"),
        ("fractional token", {"data": [datum([5, 6.5, 7])]}, InvalidRequest, "integers"),
        ("string token", {"data": [datum(["a", 6])]}, InvalidRequest, "integers"),
        ("short targets", {"data": [datum([5, 6, 7], [6, 7])]}, InvalidRequest, "length 2"),
        ("short weights", {"data": [datum([5, 6, 7], weights=[1.0])]}, InvalidRequest, "weights"),
        ("too long", {"data": [datum([5] * 1025)]}, InvalidRequest, "context"),
        ("empty tokens", {"data": [datum([], [])]}, InvalidRequest, "empty"),
        ("empty batch", {"data": []}, InvalidRequest, "non-empty"),
        ("not a datum", {"data": [{"tokens": [1]}]}, InvalidRequest, "Datum"),
        ("unknown loss", {"loss_fn": "mse"}, InvalidRequest, "unknown loss_fn"),
        ("unknown config key", {"loss_fn_config": {"beta": 1.0}}, InvalidRequest, "beta"),
        ("nan weight", {"data": [datum([5, 6], weights=[1.0, math.nan])]}, InvalidRequest, "NaN"),
        ("inf weight", {"data": [datum([5, 6], weights=[math.inf, 1.0])]}, InvalidRequest, "inf"),
        (
            "missing targets",
            {"data": [Datum(tokens=(5, 6), loss_fn_inputs={"weights": [1.0, 1.0]})]},
            InvalidRequest,
            "target_tokens",
        ),
        (
            "unknown loss input",
            {"data": [datum([5, 6], advantages=[1.0, 2.0])]},
            InvalidRequest,
            "advantages",
        ),
        (
            "rl loss without its inputs",
            {"data": [GOOD], "loss_fn": "importance_sampling"},
            InvalidRequest,
            "logprobs",
        ),
        (
            "nan advantage",
            {
                "data": [datum([5, 6], logprobs=[-1.0, -1.0], advantages=[1.0, math.nan])],
                "loss_fn": "importance_sampling",
            },
            InvalidRequest,
            "advantages",
        ),
        ("unknown run", {"run_id": "nope"}, UnknownRun, "nope"),
    ]


@pytest.mark.parametrize(
    ("case", "request_", "error", "match"),
    _bad_forward_backward_requests(),
    ids=[c[0] for c in _bad_forward_backward_requests()],
)
def test_bad_training_request_leaves_run_untouched(
    engine: Engine, case: str, request_: dict, error: type[EZTinkerError], match: str
) -> None:
    new_run(engine, "r", "tiny-llama")
    engine.forward_backward("r", [GOOD])
    engine.optim_step("r", AdamParams(learning_rate=1e-2))
    engine.forward_backward("r", [GOOD])  # pending gradients must survive the bad call
    params = params_copy(engine, "r")
    grads = grads_copy(engine, "r")
    info = engine.run_info("r")
    kwargs: dict[str, Any] = {"run_id": "r", "data": [GOOD], **request_}

    for method in (engine.forward_backward, engine.forward):
        with pytest.raises(error, match=match) as caught:
            method(**kwargs)
        assert caught.value.category == "user"

    assert engine.run_info("r") == info
    for key, value in params_copy(engine, "r").items():
        assert torch.equal(value, params[key])
        assert torch.equal(grad_of(engine, "r", key), grads[key])
    engine.optim_step("r", AdamParams(learning_rate=1e-2))
    ids = encode(engine, "tiny-llama", SENTENCE)
    losses = train(engine, "r", [sequence_datum(ids)], steps=5, lr=3e-3)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (AdamParams(learning_rate=-1.0), "learning_rate"),
        (AdamParams(learning_rate=math.nan), "learning_rate"),
        (AdamParams(beta1=1.0), "beta1"),
        (AdamParams(beta2=-0.1), "beta2"),
        (AdamParams(eps=-1.0), "eps"),
        (AdamParams(weight_decay=math.inf), "weight_decay"),
        (AdamParams(grad_clip_norm=-1.0), "grad_clip_norm"),
    ],
)
def test_bad_adam_params(engine: Engine, params: AdamParams, match: str) -> None:
    new_run(engine, "r", "tiny-gpt2")
    engine.forward_backward("r", [GOOD])
    before = params_copy(engine, "r")
    with pytest.raises(InvalidRequest, match=match):
        engine.optim_step("r", params)
    assert engine.run_info("r").step == 0 and run_state(engine, "r").has_grad()
    for key, value in params_copy(engine, "r").items():
        assert torch.equal(value, before[key])
    with pytest.raises(UnknownRun):
        engine.optim_step("nope", AdamParams())


def test_bad_run_creation(engine: Engine, tmp_path) -> None:
    with pytest.raises(UnknownModel):
        engine.create_run("r", "no-such-org/no-such-model", LoraSpec())
    with pytest.raises(UnknownModel):
        engine.create_run("r", str(tmp_path / "missing-dir"), LoraSpec())
    with pytest.raises(InvalidRequest, match="run_id"):
        engine.create_run("bad/id", "tiny-gpt2", LoraSpec())
    for spec, match in (
        (LoraSpec(rank=0), "rank"),
        (LoraSpec(alpha=-1.0), "alpha"),
        (LoraSpec(seed=-3), "seed"),
        (LoraSpec(train_attn=False, train_mlp=False, train_unembed=False), "at least one"),
    ):
        with pytest.raises(InvalidRequest, match=match):
            engine.create_run("r", "tiny-gpt2", spec)
    assert engine.list_runs() == []
    engine.create_run("r", "tiny-gpt2", LoraSpec(rank=4))
    with pytest.raises(Conflict):
        engine.create_run("r", "tiny-gpt2", LoraSpec(rank=4))
    assert engine.run_info("r").lora.rank == 4


def test_unknown_run_and_checkpoint_everywhere(engine: Engine) -> None:
    for call in (
        lambda: engine.run_info("ghost"),
        lambda: engine.delete_run("ghost"),
        lambda: engine.save_state("ghost", "x"),
        lambda: engine.save_weights_for_sampler("ghost", "x"),
        lambda: engine.load_state("ghost", "a/b"),
    ):
        with pytest.raises(UnknownRun):
            call()
    new_run(engine, "r", "tiny-gpt2")
    with pytest.raises(CheckpointNotFound):
        engine.load_state("r", "r/none")
    with pytest.raises(CheckpointNotFound):
        engine.create_run_from_checkpoint("new", "r/none")
    with pytest.raises(CheckpointNotFound):
        engine.delete_checkpoint("r/none")
    assert engine.list_runs() == ["r"]
