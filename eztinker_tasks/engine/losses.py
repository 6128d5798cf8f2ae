"""Loss functions: a registry of small pure functions with one signature.

Each takes the learner's per-token logprobs of the targets ``lp`` ([B, T], float32, with grad),
a boolean ``mask`` ([B, T], True at real positions), the other per-token ``inputs`` ([B, T]
float32 each, e.g. ``weights``, ``logprobs`` (the sampler's q), ``advantages``) and the resolved
``config``; it returns the SUM of the per-token losses over all valid positions (never a mean),
the per-token losses, and extra metrics named ``name:reduction``.
Which inputs and config keys each loss takes is declared in ``eztinker_tasks.loss_specs``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


@dataclass
class LossResult:
    loss: torch.Tensor  # scalar: sum of elementwise over valid tokens
    elementwise: torch.Tensor  # [B, T]; zero where mask is False
    metrics: dict[str, float] = field(default_factory=dict)


LossFn = Callable[
    [torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float]], LossResult
]


def cross_entropy(lp, mask, inputs, config) -> LossResult:
    """sum(-weights * logprob(target)); weights default to 1."""
    w = inputs.get("weights")
    active = mask.to(torch.bool)
    if w is None:
        w = torch.ones_like(lp)
    else:
        active = active & (w != 0)
    # Selected, not multiplied: a -inf logprob at a masked position can't make 0 * inf = NaN.
    elementwise = torch.where(active, -w * torch.where(active, lp, 0.0), 0.0)
    return LossResult(elementwise.sum(), elementwise)


# --- RL losses --------------------------------------------------------------------------------
#
# Shared conventions: q = ``inputs["logprobs"]`` (the sampler's logprobs),
# A = ``inputs["advantages"]``, w = ``inputs["weights"]`` (default 1) multiplies each token's loss,
# r = exp(lp - q).
# A token takes part only where it is real AND its weight is non-zero ("active"). Every other
# position (padding, and masked positions such as a prompt given weight 0, whose sampler logprob
# is often a placeholder like -100) is replaced by neutral values (lp = q = A = w = 0) *before*
# any arithmetic, and the result is selected with ``torch.where`` again at the end: multiplying
# by a 0/1 mask would not be enough, since exp(lp - (-100)) overflows float32 and 0 * inf = NaN
# in the forward pass; in backward, a zero upstream gradient times an infinite local derivative
# is NaN too.


@dataclass(frozen=True)
class _Tokens:
    """Per-token inputs of an RL loss, with padding already neutralised."""

    lp: torch.Tensor  # learner logprobs (grad flows only at active positions)
    q: torch.Tensor  # sampler logprobs, 0 where inactive
    adv: torch.Tensor  # advantages, 0 where inactive
    w: torch.Tensor  # per-token weights, 0 where inactive
    active: torch.Tensor  # [B, T] bool: real position with weight != 0

    @property
    def log_ratio(self) -> torch.Tensor:
        return self.lp - self.q


def _rl_tokens(lp: torch.Tensor, mask: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> _Tokens:
    mask = mask.to(device=lp.device, dtype=torch.bool)
    w = inputs.get("weights")
    if w is None:
        active = mask
    else:
        w = w.to(device=lp.device, dtype=lp.dtype)
        active = mask & (w != 0)

    def clean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(active, x.to(device=lp.device, dtype=lp.dtype), 0.0)

    return _Tokens(
        lp=torch.where(active, lp, 0.0),
        q=clean(inputs["logprobs"]),
        adv=clean(inputs["advantages"]),
        w=active.to(lp.dtype) if w is None else clean(w),
        active=active,
    )


def _result(
    t: _Tokens, objective: torch.Tensor, extra: Mapping[str, torch.Tensor] | None = None
) -> LossResult:
    """Per-token loss -w * objective (exactly 0 where inactive), its sum, the sampler metrics."""
    elementwise = torch.where(t.active, -t.w * objective, 0.0)
    return LossResult(elementwise.sum(), elementwise, _metrics(t, extra or {}))


def _metrics(t: _Tokens, extra: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Means over the active tokens (real and weight != 0); 0.0 when there are none.

    ``kl_sampler_learner:mean`` is the k3 estimator of KL(sampler || learner) from tokens drawn
    by the sampler (Schulman, "Approximating KL divergence", 2020): (r - 1) - log r per token,
    unbiased and never negative; computed as expm1(log r) - log r for accuracy near r = 1.
    """
    with torch.no_grad():
        log_r = t.log_ratio.detach()
        per_token = {
            "ratio:mean": torch.exp(log_r),
            "kl_sampler_learner:mean": torch.expm1(log_r) - log_r,
            "logprob_diff_abs:mean": log_r.abs(),
            **extra,
        }
        sums = torch.stack(
            [torch.where(t.active, v.to(log_r.dtype), 0.0).sum() for v in per_token.values()]
        )
        means = sums / t.active.sum().clamp(min=1)
        return dict(zip(per_token, means.tolist(), strict=True))


def importance_sampling(
    lp: torch.Tensor,
    mask: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float],
) -> LossResult:
    """sum(-w * r * A) with r = exp(lp - q)."""
    t = _rl_tokens(lp, mask, inputs)
    return _result(t, torch.exp(t.log_ratio) * t.adv)


def ppo(
    lp: torch.Tensor,
    mask: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float],
) -> LossResult:
    """sum(-w * min(r * A, clip(r, lo, hi) * A)); lo, hi = clip_low/high_threshold."""
    t = _rl_tokens(lp, mask, inputs)
    lo, hi = float(config["clip_low_threshold"]), float(config["clip_high_threshold"])
    r = torch.exp(t.log_ratio)
    unclipped = r * t.adv
    # The clipped term only wins the min where r is strictly outside [lo, hi], where its
    # derivative is 0; detaching says so and keeps clamp's boundary rule out of it.
    clipped = torch.clamp(r.detach(), lo, hi) * t.adv
    use_clipped = clipped < unclipped  # ties take the unclipped term and its gradient
    objective = torch.where(use_clipped, clipped, unclipped)
    return _result(t, objective, {"clip_fraction:mean": use_clipped})


def cispo(
    lp: torch.Tensor,
    mask: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float],
) -> LossResult:
    """sum(-w * stopgrad(clip(r, lo, hi)) * lp * A); lo, hi = clip_low/high_threshold."""
    t = _rl_tokens(lp, mask, inputs)
    lo, hi = float(config["clip_low_threshold"]), float(config["clip_high_threshold"])
    r = torch.exp(t.log_ratio.detach())
    coef = torch.clamp(r, lo, hi)
    return _result(t, coef * t.lp * t.adv, {"clip_fraction:mean": coef != r})


def dro(
    lp: torch.Tensor,
    mask: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float],
) -> LossResult:
    """sum(-w * (lp * A - 0.5 * beta * (lp - q)^2))."""
    t = _rl_tokens(lp, mask, inputs)
    beta = float(config["beta"])
    return _result(t, t.lp * t.adv - 0.5 * beta * t.log_ratio.square())


LOSS_FNS: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
}


def compute_loss(
    name: str,
    lp: torch.Tensor,
    mask: torch.Tensor,
    inputs: Mapping[str, torch.Tensor],
    config: Mapping[str, float],
) -> LossResult:
    """Run the registered loss ``name``; inputs and config are validated by the caller."""
    return LOSS_FNS[name](lp, mask, inputs, config)
