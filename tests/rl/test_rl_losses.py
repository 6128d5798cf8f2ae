"""The built-in RL losses through the SDK and the real service, against plain PyTorch.

For each loss: ``loss:sum``, the per-token losses and logprobs and the metrics equal a
reference computed here from the ``forward`` logprobs and the given q / A; and the gradient is
the reference one: one step of the RL loss and one step of cross_entropy with weights
-dLoss/dlp (twin runs) leave the same weights behind. Bad requests are refused with a 4xx that
names what is wrong, over raw HTTP and as an SDK exception of category "user".
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

import eztinker
from eztinker import types
from eztinker.errors import BadRequestError
from tests.rl.rl_helpers import (
    ATOL,
    forward_logprobs,
    grad_wrt_logprobs,
    logprobs,
    max_abs_diff,
    plain_datum,
    random_tokens,
    rl_reference,
    step_twins,
    twin_runs,
    with_weights,
)

LOSSES: dict[str, dict[str, float]] = {
    "importance_sampling": {},
    "ppo": {},  # the defaults: clip 0.8 / 1.2
    "cispo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "dro": {"beta": 0.7},
}


def rl_batch(
    rng: np.random.Generator, lp: list[np.ndarray], data: list[types.Datum]
) -> tuple[list[types.Datum], list[np.ndarray], list[np.ndarray]]:
    """Add sampler logprobs q (lp shifted by up to +-0.4, so ratios fall on both sides of the
    clip range) and advantages of both signs to ``data``."""
    q = [(x + rng.uniform(-0.4, 0.4, len(x))).astype(np.float32) for x in lp]
    adv = [rng.normal(size=len(x)).astype(np.float32) for x in lp]
    batch = [
        types.Datum(d.model_input, {**d.loss_fn_inputs, "logprobs": qi, "advantages": ai})
        for d, qi, ai in zip(data, q, adv, strict=True)
    ]
    return batch, q, adv


def expected_metrics(
    name: str,
    lp: list[np.ndarray],
    q: list[np.ndarray],
    adv: list[np.ndarray],
    config: dict[str, float],
) -> dict[str, float]:
    """Token means of the sampler/learner diagnostics, from their definitions.

    ``clip_fraction``: for ppo the tokens where the clipped term wins the min (its gradient is
    then 0), for cispo the tokens whose ratio is outside [lo, hi].
    """
    d = np.concatenate(lp).astype(np.float64) - np.concatenate(q)
    r, a = np.exp(d), np.concatenate(adv)
    out = {
        "ratio:mean": r.mean(),
        "kl_sampler_learner:mean": (r - 1 - d).mean(),  # k3 estimator of KL(sampler || learner)
        "logprob_diff_abs:mean": np.abs(d).mean(),
    }
    lo, hi = config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2)
    if name == "ppo":
        out["clip_fraction:mean"] = (np.clip(r, lo, hi) * a < r * a).mean()
    if name == "cispo":
        out["clip_fraction:mean"] = ((r < lo) | (r > hi)).mean()
    return out


@pytest.mark.parametrize("name", list(LOSSES))
def test_rl_loss_matches_pytorch_reference(sdk: eztinker.ServiceClient, name: str) -> None:
    config = LOSSES[name]
    rng = np.random.default_rng(sorted(LOSSES).index(name))
    run_a, run_b = twin_runs(sdk, seed=7)
    data = [plain_datum(random_tokens(rng, n)) for n in (13, 9, 16)]  # padded: lengths differ
    lp = forward_logprobs(run_a, data)
    assert max_abs_diff(lp, forward_logprobs(run_b, data)) == 0.0  # twins start identical
    batch, q, adv = rl_batch(rng, lp, data)
    total, per_token, grad = grad_wrt_logprobs(
        lambda lps: rl_reference(name, lps, q, adv, config), lp
    )

    # A: the RL loss. Its outputs are the reference's.
    out = run_a.forward_backward(batch, name, config or None).result()
    assert out.metrics["loss:sum"] == pytest.approx(total, rel=1e-5, abs=1e-5)
    assert max_abs_diff(logprobs(out), lp) == 0.0
    assert max_abs_diff(logprobs(out, "elementwise_loss"), per_token) < ATOL
    for key, value in expected_metrics(name, lp, q, adv, config).items():
        assert out.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    if name in ("ppo", "cispo"):  # the batch really exercises the clipping
        assert 0.05 < out.metrics["clip_fraction:mean"] < 0.9
    assert out.metrics["num_tokens:sum"] == sum(len(x) for x in lp)

    # B: cross_entropy with weights -dLoss/dlp: the same gradient, hence the same step.
    linear = run_b.forward_backward(with_weights(data, [-g for g in grad])).result()
    linear_loss = sum(float((g * x).sum()) for g, x in zip(grad, lp, strict=True))  # -w * lp
    assert linear.metrics["loss:sum"] == pytest.approx(linear_loss, rel=1e-5, abs=1e-5)
    step_twins(run_a, run_b, data, lp, name)
    for tc in (run_a, run_b):
        sdk.delete_run(tc.run_id).result()


def test_ppo_explicit_clip_thresholds(sdk: eztinker.ServiceClient) -> None:
    """A non-default clip range is applied (and changes the loss)."""
    rng = np.random.default_rng(11)
    tc = sdk.create_lora_training_client("tiny-gpt2", rank=4, seed=3)
    data = [plain_datum(random_tokens(rng, n)) for n in (12, 8)]
    lp = forward_logprobs(tc, data)
    batch, q, adv = rl_batch(rng, lp, data)
    config = {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05}
    total, _, _ = grad_wrt_logprobs(lambda lps: rl_reference("ppo", lps, q, adv, config), lp)
    default, _, _ = grad_wrt_logprobs(lambda lps: rl_reference("ppo", lps, q, adv, {}), lp)
    out = tc.forward(batch, "ppo", config).result()
    assert out.metrics["loss:sum"] == pytest.approx(total, rel=1e-5, abs=1e-5)
    assert abs(total - default) > 1e-2
    assert out.metrics["clip_fraction:mean"] == pytest.approx(
        expected_metrics("ppo", lp, q, adv, config)["clip_fraction:mean"]
    )
    sdk.delete_run(tc.run_id).result()


# -- bad requests ----------------------------------------------------------------------------
def _rl_inputs(*drop: str) -> dict[str, list[int] | list[float]]:
    inputs = {
        "target_tokens": [5, 6, 7],
        "logprobs": [-7.0, -7.5, -8.0],
        "advantages": [1.0, -1.0, 0.5],
    }
    return {k: v for k, v in inputs.items() if k not in drop}


# case -> (loss_fn, loss_fn_config, inputs left out, words the error must name)
BAD_REQUESTS: dict[str, tuple[str, dict[str, float] | None, tuple[str, ...], tuple[str, ...]]] = {
    "missing advantages": ("importance_sampling", None, ("advantages",), ("advantages",)),
    "missing logprobs": ("ppo", None, ("logprobs",), ("logprobs",)),
    "unknown config key": ("ppo", {"clip_epsilon": 0.2}, (), ("clip_epsilon",)),
    "missing required beta": ("dro", None, (), ("beta",)),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_rl_requests_are_user_errors(
    sdk: eztinker.ServiceClient, http: httpx.Client, case: str
) -> None:
    loss_fn, config, drop, named = BAD_REQUESTS[case]
    tc = sdk.create_lora_training_client("tiny-gpt2", rank=4)

    datum = {"model_input": {"tokens": [4, 5, 6]}, "loss_fn_inputs": _rl_inputs(*drop)}
    body: dict[str, Any] = {"data": [datum], "loss_fn": loss_fn}
    if config is not None:
        body["loss_fn_config"] = config
    response = http.post(f"/v1/runs/{tc.run_id}/forward_backward", json=body)
    assert 400 <= response.status_code < 500, response.text
    envelope = response.json()
    assert envelope["status"] == response.status_code and envelope["category"] == "user"
    for word in named:
        assert word in envelope["message"] and word in str(envelope["errors"]), envelope

    bad = types.Datum(types.ModelInput.from_ints([4, 5, 6]), _rl_inputs(*drop))
    with pytest.raises(BadRequestError) as info:
        tc.forward_backward([bad], loss_fn, config).result()
    err = info.value
    assert err.category == "user" and err.is_user_error and 400 <= (err.status or 0) < 500
    assert all(word in err.message for word in named), err

    # Nothing was applied, and the run still works.
    good = types.Datum(types.ModelInput.from_ints([4, 5, 6]), _rl_inputs())
    fixed = {"beta": 1.0} if loss_fn == "dro" else None
    assert np.isfinite(tc.forward_backward([good], loss_fn, fixed).result().metrics["loss:sum"])
    assert tc.get_info().step == 0
    sdk.delete_run(tc.run_id).result()
