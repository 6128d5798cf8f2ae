"""Helpers of the RL tests: random batches, twin runs and the plain PyTorch references.

Twin runs are two LoRA runs created with the same seed and given the same warm-up step, so
their weights are identical (a fresh adapter has lora_B = 0, so only lora_B would get a
gradient; after the warm-up every LoRA matrix does). Driving one with loss X and the other with
cross_entropy whose weights are -dX/dlp must leave them identical again after
``optim_step(SGD_LIKE)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest
import torch

import eztinker
from eztinker import types

VOCAB = 2048  # both built-in tiny models

# A large eps makes Adam's update lr * m_hat / (sqrt(v_hat) + eps) nearly linear in the
# gradient (with eps = 1e-12 the first step is lr * sign(g)), so matching twin runs checks the
# gradient's magnitude and not only its sign.
SGD_LIKE = types.AdamParams(learning_rate=0.5, eps=10.0)
WARM_UP = types.AdamParams(learning_rate=1e-2)

# Agreement of two CPU float32 computations of the same quantity by different routes.
ATOL = 2e-5


def random_tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(1, VOCAB, n).tolist()


def plain_datum(tokens: Sequence[int], **inputs: Sequence[float]) -> types.Datum:
    """``tokens[:-1]`` predicting ``tokens[1:]``, with extra per-position ``inputs``."""
    return types.Datum(
        types.ModelInput.from_ints(tokens[:-1]),
        {"target_tokens": list(tokens[1:]), **{k: list(v) for k, v in inputs.items()}},
    )


def targets_only(data: Sequence[types.Datum]) -> list[types.Datum]:
    return [
        types.Datum(d.model_input, {"target_tokens": d.loss_fn_inputs["target_tokens"]})
        for d in data
    ]


def with_weights(data: Sequence[types.Datum], weights: Sequence[np.ndarray]) -> list[types.Datum]:
    """The same datums for cross_entropy, with per-token ``weights``."""
    return [
        types.Datum(
            d.model_input, {"target_tokens": d.loss_fn_inputs["target_tokens"], "weights": w}
        )
        for d, w in zip(data, weights, strict=True)
    ]


def logprobs(out: types.ForwardBackwardOutput, key: str = "logprobs") -> list[np.ndarray]:
    return [o[key].to_numpy() for o in out.loss_fn_outputs]


def forward_logprobs(tc: eztinker.TrainingClient, data: Sequence[types.Datum]) -> list[np.ndarray]:
    """The learner's per-token logprobs of ``data``'s targets (no state change)."""
    return logprobs(tc.forward(targets_only(data)).result())


def max_abs_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return float(max(np.abs(x - y).max() for x, y in zip(a, b, strict=True)))


def twin_runs(
    sdk: eztinker.ServiceClient, model: str = "tiny-gpt2", seed: int = 0
) -> tuple[eztinker.TrainingClient, eztinker.TrainingClient]:
    """Two runs with identical weights and optimizer state (same seed, same warm-up step)."""
    rng = np.random.default_rng(1000 + seed)
    warm = [plain_datum(random_tokens(rng, 10)), plain_datum(random_tokens(rng, 7))]
    runs = []
    for _ in range(2):
        tc = sdk.create_lora_training_client(model, rank=4, seed=seed)
        tc.forward_backward(warm).result()
        tc.optim_step(WARM_UP).result()
        runs.append(tc)
    return runs[0], runs[1]


def step_twins(
    run_a: eztinker.TrainingClient,
    run_b: eztinker.TrainingClient,
    data: Sequence[types.Datum],
    before: Sequence[np.ndarray],
    label: str,
) -> list[np.ndarray]:
    """The same ``optim_step(SGD_LIKE)`` on two runs that accumulated what should be the same
    gradient: check equal gradient norms, a real move of the logprobs of ``data`` away from
    ``before``, and identical results. Returns run A's logprobs after the step."""
    norm_a = run_a.optim_step(SGD_LIKE).result().metrics or {}
    norm_b = run_b.optim_step(SGD_LIKE).result().metrics or {}
    assert norm_a["grad_norm"] == pytest.approx(norm_b["grad_norm"], rel=1e-5)
    after_a, after_b = forward_logprobs(run_a, data), forward_logprobs(run_b, data)
    moved, twin_diff = max_abs_diff(after_a, before), max_abs_diff(after_a, after_b)
    print(f"{label}: step moved logprobs by up to {moved:.3g}; twins differ by {twin_diff:.3g}")
    assert moved > 500 * ATOL, moved  # the step did change the model noticeably
    assert twin_diff < ATOL, (moved, twin_diff)
    return after_a


def grad_wrt_logprobs(
    loss_fn, lp: Sequence[np.ndarray]
) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
    """Plain PyTorch: ``loss_fn(list of lp tensors) -> per-token losses`` (one per datum).

    Returns the summed loss, the per-token losses and d loss / d lp, all float32.
    """
    tensors = [torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in lp]
    per_token = loss_fn(tensors)
    total = torch.stack([t.sum() for t in per_token]).sum()
    total.backward()
    grads = [t.grad.numpy() if t.grad is not None else np.zeros(len(t)) for t in tensors]
    return float(total.detach()), [t.detach().numpy() for t in per_token], grads


def rl_reference(
    name: str,
    lp: Sequence[torch.Tensor],
    q: Sequence[np.ndarray],
    adv: Sequence[np.ndarray],
    config: Mapping[str, float],
) -> list[torch.Tensor]:
    """The per-token RL losses, written from their definitions (r = exp(lp - q))."""
    lo = config.get("clip_low_threshold", 0.8)
    hi = config.get("clip_high_threshold", 1.2)
    out = []
    for x, q_np, a_np in zip(lp, q, adv, strict=True):
        q_t, a = torch.from_numpy(q_np), torch.from_numpy(a_np)
        r = torch.exp(x - q_t)
        if name == "importance_sampling":
            out.append(-r * a)
        elif name == "ppo":
            out.append(-torch.minimum(r * a, torch.clamp(r, lo, hi) * a))
        elif name == "cispo":
            out.append(-torch.clamp(r, lo, hi).detach() * x * a)
        elif name == "dro":
            out.append(-(x * a - 0.5 * config["beta"] * (x - q_t) ** 2))
        else:
            raise ValueError(name)
    return out
