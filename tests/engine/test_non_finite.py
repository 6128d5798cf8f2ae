"""No NaN or inf ever reaches a run's gradient or weights (issue 10, A1).

Masked positions (weight 0) never enter the arithmetic, so a placeholder sampler logprob such as
-100 there gives a finite loss equal to the formula over the unmasked tokens; a pass whose loss
or gradient is still non-finite fails with a ``user`` error naming the datum and the position
and leaves the accumulated gradient exactly as it was; ``optim_step`` refuses a non-finite
gradient and changes nothing; inputs and hyper-parameters that would break the arithmetic are
refused before anything runs.
"""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import assert_same_tensors, datum, grads_copy, new_run, params_copy, run_state

from eztinker_tasks.engine import Engine
from eztinker_tasks.errors import InvalidRequest, NonFiniteValue
from eztinker_tasks.types import AdamParams, LoraSpec, SampleSource, SamplingParams

RL_LOSSES = ("importance_sampling", "ppo", "cispo", "dro")
CONFIG = {"dro": {"beta": 0.1}}

# The input: the prompt position has weight 0 and the common "ignore" logprob -100.
TOKENS, TARGETS = [5, 17, 42], [17, 42, 99]
MASKED = {"logprobs": [-100.0, -7.0, -7.0], "advantages": [0.0, 1.0, 1.0], "weights": [0, 1, 1]}


def _reference(loss_fn: str, lp: torch.Tensor, q: torch.Tensor, adv: torch.Tensor) -> float:
    """The loss formula over the unmasked tokens only (plain PyTorch, float64)."""
    lp, q, adv = lp.double(), q.double(), adv.double()
    r = torch.exp(lp - q)
    if loss_fn == "importance_sampling":
        per_token = -(r * adv)
    elif loss_fn == "ppo":
        per_token = -torch.minimum(r * adv, r.clamp(0.8, 1.2) * adv)
    elif loss_fn == "cispo":
        per_token = -(r.clamp(0.8, 1.2) * lp * adv)
    else:
        per_token = -(lp * adv - 0.5 * 0.1 * (lp - q) ** 2)
    return float(per_token.sum())


@pytest.mark.parametrize("loss_fn", RL_LOSSES)
def test_masked_placeholder_logprob_gives_the_formula_over_unmasked_tokens(
    engine: Engine, loss_fn: str
) -> None:
    new_run(engine, "r", "tiny-gpt2")
    # A first step so that every LoRA matrix gets a gradient (lora_B starts at 0).
    engine.forward_backward("r", [datum(TOKENS, TARGETS)])
    engine.optim_step("r", AdamParams(learning_rate=1e-2))
    learner = engine.forward("r", [datum(TOKENS, TARGETS)]).loss_fn_outputs[0]["logprobs"]
    # Near-on-policy sampler logprobs where it counts (every loss has a gradient there), the
    # placeholder at the masked prompt position.
    inputs = {**MASKED, "logprobs": [-100.0, learner[1] - 0.05, learner[2] + 0.05]}
    out = engine.forward_backward(
        "r", [datum(TOKENS, TARGETS, **inputs)], loss_fn, CONFIG.get(loss_fn)
    )
    loss = out.metrics["loss:sum"]
    assert math.isfinite(loss)
    q, adv = torch.tensor(inputs["logprobs"][1:]), torch.tensor(MASKED["advantages"][1:])
    expected = _reference(loss_fn, torch.tensor(learner[1:]), q, adv)
    assert loss == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert out.loss_fn_outputs[0]["elementwise_loss"][0] == 0.0
    step = engine.optim_step("r", AdamParams(learning_rate=1e-2))
    assert math.isfinite(step.metrics["grad_norm"]) and step.metrics["grad_norm"] > 0
    assert all(torch.isfinite(p).all() for p in run_state(engine, "r").params.values())
    # And the run still samples.
    sampled = engine.sample(SampleSource(run_id="r"), [5, 17], 2, SamplingParams(max_tokens=4))
    assert all(len(s.tokens) >= 1 for s in sampled.sequences)


def test_minus_inf_logprob_at_a_masked_position_is_refused_as_input(engine: Engine) -> None:
    new_run(engine, "r", "tiny-gpt2")
    bad = {**MASKED, "logprobs": [-math.inf, -7.0, -7.0]}
    with pytest.raises(InvalidRequest, match="NaN and inf"):
        engine.forward_backward("r", [datum(TOKENS, TARGETS, **bad)], "importance_sampling")


@pytest.mark.parametrize("op", ["forward_backward", "forward"])
def test_overflowing_ratio_at_a_weighted_position_fails_naming_datum_and_position(
    engine: Engine, op: str
) -> None:
    new_run(engine, "r", "tiny-gpt2")
    good = datum(TOKENS, TARGETS, **MASKED)
    engine.forward_backward("r", [good], "importance_sampling")
    before = grads_copy(engine, "r")
    # exp(lp - (-1e30)) overflows at data[1] position 2, which has weight 1.
    huge = {**MASKED, "logprobs": [-100.0, -7.0, -1e30]}
    with pytest.raises(NonFiniteValue, match=r"data\[1\] position 2") as caught:
        getattr(engine, op)("r", [good, datum(TOKENS, TARGETS, **huge)], "importance_sampling")
    assert caught.value.category == "user"
    assert "logprobs -1e+30" in caught.value.message
    assert_same_tensors(grads_copy(engine, "r"), before)


def test_a_refused_pass_leaves_the_gradient_that_the_next_step_applies(
    make_engine, data_dir
) -> None:
    """After a refused call the run trains exactly as if the call had never been made."""
    a, b = make_engine(), make_engine()
    for engine in (a, b):
        new_run(engine, "r", "tiny-llama", seed=3)
        engine.forward_backward("r", [datum(TOKENS, TARGETS)])
    huge = datum(TOKENS, TARGETS, weights=[3e38, 3e38, 3e38])  # the loss sum overflows
    with pytest.raises(NonFiniteValue, match=r"not finite|beyond float32"):
        a.forward_backward("r", [huge])
    for engine in (a, b):
        engine.forward_backward("r", [datum(TOKENS, TARGETS)])
        engine.optim_step("r", AdamParams(learning_rate=1e-2))
    assert_same_tensors(params_copy(a, "r"), params_copy(b, "r"))


def test_optim_step_refuses_a_non_finite_gradient_and_changes_nothing(engine: Engine) -> None:
    new_run(engine, "r", "tiny-gpt2")
    engine.forward_backward("r", [datum(TOKENS, TARGETS)])
    engine.optim_step("r", AdamParams(learning_rate=1e-2))
    engine.forward_backward("r", [datum(TOKENS, TARGETS)])
    run = run_state(engine, "r")
    # No request can put NaN into a gradient (the pass above refuses it): plant one.
    grad = run.leaves[0].grad
    assert grad is not None
    grad.view(-1)[0] = math.nan
    weights, step = params_copy(engine, "r"), run.step
    moments = {
        id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
        for p, s in run.optimizer.state.items()
    }
    with pytest.raises(NonFiniteValue, match="refused"):
        engine.optim_step("r", AdamParams(learning_rate=1e-2))
    assert_same_tensors(params_copy(engine, "r"), weights)
    assert run.step == step
    for p, state in run.optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, moments[id(p)][key]), key


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("logprobs", [0.0, 5.0, -1.0], "above 0"),
        ("logprobs", [0.0, math.nan, -1.0], "NaN"),
        ("advantages", [0.0, 1e39, 1.0], "float32"),
        ("weights", [0.0, -1e39, 1.0], "float32"),
    ],
)
def test_absurd_loss_inputs_are_refused_before_anything_runs(
    engine: Engine, field: str, value: list[float], match: str
) -> None:
    new_run(engine, "r", "tiny-gpt2")
    inputs = {**MASKED, field: value}
    with pytest.raises(InvalidRequest, match=match):
        engine.forward_backward("r", [datum(TOKENS, TARGETS, **inputs)], "ppo")
    assert not run_state(engine, "r").has_grad()


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (AdamParams(eps=0.0), "eps"),
        (AdamParams(eps=1e-45), "eps"),
        (AdamParams(learning_rate=1e30), "learning_rate"),
        (AdamParams(learning_rate=10.0, weight_decay=0.5), "weight_decay"),
    ],
)
def test_hyper_parameters_that_break_adamw_are_refused(
    engine: Engine, params: AdamParams, field: str
) -> None:
    new_run(engine, "r", "tiny-gpt2")
    engine.forward_backward("r", [datum(TOKENS, TARGETS)])
    with pytest.raises(InvalidRequest) as caught:
        engine.optim_step("r", params)
    assert field in caught.value.errors
    assert run_state(engine, "r").step == 0


@pytest.mark.parametrize(
    ("lora", "field"),
    [
        (LoraSpec(alpha=1e300), "alpha"),
        (LoraSpec(alpha=0.0), "alpha"),
        (LoraSpec(seed=2**64), "seed"),
        (LoraSpec(seed=-1), "seed"),
    ],
)
def test_lora_specs_that_break_the_arithmetic_are_refused(
    engine: Engine, lora: LoraSpec, field: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        engine.create_run("r", "tiny-gpt2", lora)
    assert field in caught.value.errors
    assert not engine.has_run("r")
