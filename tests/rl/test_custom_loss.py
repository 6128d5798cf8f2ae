"""``forward_backward_custom`` with a DPO loss, checked against the same loss computed here.

The client runs ``forward``, evaluates the user's loss on the logprobs with torch, and sends a
cross_entropy ``forward_backward`` whose weights are -dLoss/dlp. So (a) the reported
``loss:sum`` is the DPO loss of the current weights, (b) the step it leads to is the step of
the exact DPO gradient (twin runs: custom loss vs cross_entropy with weights computed here),
and (c) that step widens the chosen-over-rejected margin.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import eztinker
from eztinker import types
from tests.rl.rl_helpers import (
    forward_logprobs,
    logprobs,
    max_abs_diff,
    random_tokens,
    step_twins,
    twin_runs,
    with_weights,
)

BETA = 0.5


def pair_data(rng: np.random.Generator, pairs: int) -> list[types.Datum]:
    """[chosen_0, rejected_0, chosen_1, ...]: a shared prompt, then two different completions
    (weights 1 on the completion's tokens, 0 on the prompt's)."""
    data = []
    for _ in range(pairs):
        prompt = random_tokens(rng, 5)
        for n in (6, 8):  # chosen and rejected differ in length too (padding)
            tokens = prompt + random_tokens(rng, n)
            weights = [0.0] * (len(prompt) - 1) + [1.0] * n
            data.append(
                types.Datum(
                    types.ModelInput.from_ints(tokens[:-1]),
                    {"target_tokens": tokens[1:], "weights": weights},
                )
            )
    return data


def with_reference(data: list[types.Datum], ref: list[np.ndarray]) -> list[types.Datum]:
    """Store the frozen reference's logprobs in each datum (the loss reads them from there)."""
    return [
        types.Datum(d.model_input, {**d.loss_fn_inputs, "ref_logprobs": r})
        for d, r in zip(data, ref, strict=True)
    ]


def dpo_margins(data: list[types.Datum], lps: list) -> torch.Tensor:
    """beta * ((lp_c - ref_c) - (lp_r - ref_r)) per pair, on completion-token sums."""
    seq = []
    for d, lp in zip(data, lps, strict=True):
        w = d.loss_fn_inputs["weights"].to_torch()
        ref = d.loss_fn_inputs["ref_logprobs"].to_torch()
        seq.append(((lp - ref) * w).sum())
    logratio = torch.stack(seq)
    return BETA * (logratio[0::2] - logratio[1::2])


def dpo_loss(data: list[types.Datum], lps: list) -> tuple[torch.Tensor, dict[str, float]]:
    """The user's loss, as ``forward_backward_custom`` takes it."""
    margins = dpo_margins(data, lps)
    loss = -torch.nn.functional.logsigmoid(margins).sum()
    return loss, {"margin:mean": float(margins.detach().mean()), "pairs:sum": float(len(margins))}


def reference(data: list[types.Datum], lp: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    """The DPO loss at logprobs ``lp`` and d loss / d lp, computed here."""
    tensors = [torch.tensor(x, requires_grad=True) for x in lp]
    loss, _ = dpo_loss(data, tensors)
    loss.backward()
    grads = []
    for t in tensors:
        assert t.grad is not None  # every sequence enters a pair
        grads.append(t.grad.numpy())
    return float(loss.detach()), grads


def test_dpo_custom_loss_is_exact(sdk: eztinker.ServiceClient) -> None:
    rng = np.random.default_rng(5)
    run_a, run_b = twin_runs(sdk, seed=5)
    raw = pair_data(rng, pairs=3)
    ref = forward_logprobs(run_a, raw)  # the frozen reference: the policy before training
    assert max_abs_diff(ref, forward_logprobs(run_b, raw)) == 0.0
    data = with_reference(raw, ref)

    # Run A: the custom loss. Policy == reference, so every margin is 0 and loss = n log 2.
    expected, grad = reference(data, ref)
    assert expected == pytest.approx(3 * np.log(2), rel=1e-6)
    out = run_a.forward_backward_custom(data, dpo_loss).result()
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-6)
    assert out.metrics["pairs:sum"] == 3 and out.metrics["margin:mean"] == 0.0
    assert max_abs_diff(logprobs(out), ref) == 0.0

    # Run B: plain cross_entropy with weights -dLoss/dlp computed here; same step after.
    run_b.forward_backward(with_weights(raw, [-g for g in grad])).result()
    lp_a = step_twins(run_a, run_b, raw, ref, "dpo")

    # The step widened every chosen-over-rejected margin and lowered the loss.
    margins = dpo_margins(data, [torch.from_numpy(x) for x in lp_a])
    assert bool((margins > 0).all()), margins
    # (a) at weights != reference: the reported loss is the DPO loss of the forward logprobs.
    expected_next, _ = reference(data, lp_a)
    assert expected_next < expected
    again = run_a.forward_backward_custom(data, dpo_loss).result()
    assert again.metrics["loss:sum"] == pytest.approx(expected_next, rel=1e-5)
    assert again.metrics["margin:mean"] == pytest.approx(float(margins.mean()), rel=1e-5)
    for tc in (run_a, run_b):
        sdk.delete_run(tc.run_id).result()
