"""RL losses against plain, token-by-token references written over python floats.

The references below share no code with ``eztinker_tasks.engine.losses``: each returns, for one
token, the loss and its derivative w.r.t. the learner logprob ``lp``, derived by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from eztinker_tasks.engine.losses import LOSS_FNS, LossResult, compute_loss
from eztinker_tasks.loss_specs import LOSS_SPECS, get_loss_spec, resolve_loss_config

RL_LOSSES = ("importance_sampling", "ppo", "cispo", "dro")
B, T = 4, 9

# (lp, q, A, w, config) -> (loss, d loss / d lp) for one valid token
TokenRef = Callable[[float, float, float, float, dict[str, float]], tuple[float, float]]


def _clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def ref_importance_sampling(lp, q, a, w, cfg):
    r = math.exp(lp - q)
    return -w * r * a, -w * r * a  # d r / d lp = r


def ref_ppo(lp, q, a, w, cfg):
    lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
    r = math.exp(lp - q)
    unclipped, clipped = r * a, _clip(r, lo, hi) * a
    if clipped < unclipped:  # the clipped term is chosen, so r is strictly outside [lo, hi]
        return -w * clipped, 0.0
    return -w * unclipped, -w * r * a


def ref_cispo(lp, q, a, w, cfg):
    coef = _clip(math.exp(lp - q), cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    return -w * coef * lp * a, -w * coef * a  # coef is a constant for the gradient


def ref_dro(lp, q, a, w, cfg):
    beta = cfg["beta"]
    return -w * (lp * a - 0.5 * beta * (lp - q) ** 2), -w * (a - beta * (lp - q))


REFS: dict[str, TokenRef] = {
    "importance_sampling": ref_importance_sampling,
    "ppo": ref_ppo,
    "cispo": ref_cispo,
    "dro": ref_dro,
}


def ref_metrics(name, lp, q, a, w, mask, cfg) -> dict[str, float]:
    """Means over tokens that are valid and have a nonzero weight."""
    rows = []
    for b in range(len(mask)):
        for i in range(len(mask[b])):
            if not mask[b][i] or w[b][i] == 0:
                continue
            r = math.exp(lp[b][i] - q[b][i])
            row = {
                "ratio:mean": r,
                "kl_sampler_learner:mean": (r - 1) - math.log(r),
                "logprob_diff_abs:mean": abs(lp[b][i] - q[b][i]),
            }
            if name in ("ppo", "cispo"):
                lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
                if name == "ppo":
                    clipped = _clip(r, lo, hi) * a[b][i] < r * a[b][i]
                else:
                    clipped = r < lo or r > hi
                row["clip_fraction:mean"] = float(clipped)
            rows.append(row)
    if not rows:
        return {}
    return {k: sum(row[k] for row in rows) / len(rows) for k in rows[0]}


def config_for(name: str, **overrides: float) -> dict[str, float]:
    given: dict[str, float] = {"beta": 0.3} if name == "dro" else {}
    return resolve_loss_config(get_loss_spec(name), {**given, **overrides})


def random_batch(seed: int, with_weights: bool = True):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # one full row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    q = -torch.rand(B, T, generator=g) * 3
    lp = q + torch.randn(B, T, generator=g) * 0.3  # ratios spread on both sides of the clip
    inputs = {"logprobs": q, "advantages": torch.randn(B, T, generator=g)}
    if with_weights:
        inputs["weights"] = torch.rand(B, T, generator=g) * 2
    return lp, mask, inputs


def run(name, lp, mask, inputs, cfg) -> tuple[LossResult, torch.Tensor]:
    lp = lp.clone().requires_grad_(True)
    result = compute_loss(name, lp, mask, inputs, cfg)
    result.loss.backward()
    assert lp.grad is not None
    return result, lp.grad


def reference(name, lp, mask, inputs, cfg):
    """Per-token loss and gradient lists, 0 at padding; and the total (summed in float64)."""
    lp_l, q_l, a_l = lp.tolist(), inputs["logprobs"].tolist(), inputs["advantages"].tolist()
    w_l = inputs["weights"].tolist() if "weights" in inputs else [[1.0] * T for _ in range(B)]
    m_l = mask.tolist()
    loss = [[0.0] * T for _ in range(B)]
    grad = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for i in range(T):
            if m_l[b][i]:
                loss[b][i], grad[b][i] = REFS[name](
                    lp_l[b][i], q_l[b][i], a_l[b][i], w_l[b][i], cfg
                )
    total = sum(sum(row) for row in loss)
    metrics = ref_metrics(name, lp_l, q_l, a_l, w_l, m_l, cfg)
    return total, torch.tensor(loss), torch.tensor(grad), metrics


# --- registry ------------------------------------------------------------------------------------


def test_registry_matches_specs():
    assert set(LOSS_FNS) == set(LOSS_SPECS)


@pytest.mark.parametrize("name", sorted(LOSS_FNS))
def test_every_loss_has_a_one_line_docstring(name):
    doc = LOSS_FNS[name].__doc__
    assert doc and doc.strip() and "\n" not in doc.strip()


# --- values and gradients on random batches -------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("with_weights", [True, False])
@pytest.mark.parametrize("name", RL_LOSSES)
def test_value_grad_metrics_match_reference(name, seed, with_weights):
    lp, mask, inputs = random_batch(seed, with_weights)
    cfg = config_for(name)
    result, grad = run(name, lp, mask, inputs, cfg)
    total, ref_elem, ref_grad, ref_m = reference(name, lp, mask, inputs, cfg)

    torch.testing.assert_close(result.loss.item(), total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.elementwise.detach(), ref_elem, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert result.loss.dim() == 0 and result.elementwise.shape == (B, T)
    assert (result.elementwise[~mask] == 0).all() and (grad[~mask] == 0).all()

    assert "loss:sum" not in result.metrics
    assert set(result.metrics) == set(ref_m)
    for key, value in result.metrics.items():
        assert type(value) is float
        assert value == pytest.approx(ref_m[key], rel=1e-5, abs=1e-6), key


def test_the_random_batches_exercise_both_ppo_branches():
    lp, mask, inputs = random_batch(0)
    metrics = run("ppo", lp, mask, inputs, config_for("ppo"))[0].metrics
    assert 0.05 < metrics["clip_fraction:mean"] < 0.95


@pytest.mark.parametrize("name", RL_LOSSES)
def test_loss_is_a_sum_not_a_mean(name):
    lp, mask, inputs = random_batch(7)
    cfg = config_for(name)
    one = compute_loss(name, lp, mask, inputs, cfg).loss
    doubled = {k: torch.cat([v, v]) for k, v in inputs.items()}
    two = compute_loss(name, torch.cat([lp, lp]), torch.cat([mask, mask]), doubled, cfg).loss
    torch.testing.assert_close(two, 2 * one)


@pytest.mark.parametrize("name", RL_LOSSES)
def test_weights_default_to_one(name):
    lp, mask, inputs = random_batch(3, with_weights=False)
    cfg = config_for(name)
    implicit = compute_loss(name, lp, mask, inputs, cfg)
    explicit = compute_loss(name, lp, mask, {**inputs, "weights": torch.ones(B, T)}, cfg)
    torch.testing.assert_close(implicit.elementwise, explicit.elementwise)
    assert implicit.metrics == explicit.metrics


@pytest.mark.parametrize("name", RL_LOSSES)
def test_zero_weight_tokens_drop_out_of_loss_and_metrics(name):
    lp, mask, inputs = random_batch(4)
    cfg = config_for(name)
    zeroed = torch.zeros(B, T, dtype=torch.bool)
    zeroed[:, ::2] = True
    weighted = {**inputs, "weights": torch.where(zeroed, 0.0, inputs["weights"])}
    as_padding = compute_loss(name, lp, mask & ~zeroed, inputs, cfg)
    as_weights = compute_loss(name, lp, mask, weighted, cfg)
    torch.testing.assert_close(as_weights.elementwise, as_padding.elementwise)
    assert as_weights.metrics == pytest.approx(as_padding.metrics)


def test_dro_beta_matters_and_zero_beta_is_weighted_policy_gradient():
    lp, mask, inputs = random_batch(5)
    _, grad0 = run("dro", lp, mask, inputs, config_for("dro", beta=0.0))
    expected = torch.where(mask, -inputs["weights"] * inputs["advantages"], 0.0)
    torch.testing.assert_close(grad0, expected)
    r1, grad1 = run("dro", lp, mask, inputs, config_for("dro", beta=1.0))
    r2, grad2 = run("dro", lp, mask, inputs, config_for("dro", beta=2.0))
    # The penalty is linear in beta: loss(2) - loss(1) = sum(0.5 * w * (lp - q)^2).
    penalty = torch.where(mask, 0.5 * inputs["weights"] * (lp - inputs["logprobs"]) ** 2, 0.0)
    torch.testing.assert_close(r2.loss - r1.loss, penalty.sum())
    assert not torch.allclose(grad1, grad2)


def test_dro_needs_beta():
    from eztinker_tasks.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        resolve_loss_config(get_loss_spec("dro"), {})


# --- clipping edges ------------------------------------------------------------------------------
#
# exp(0) == 1 exactly, so a token with lp == q has r exactly 1.0; the thresholds are then put at
# 1.0 to place r exactly on an edge. log r = +-0.5 puts r strictly above 1.2 / below 0.8.

LOG_R = {"below": -0.5, "inside": 0.0, "above": 0.5}


def edge_batch(log_ratios: list[float], advantages: list[float]):
    lp = torch.tensor([[-1.3 + x for x in log_ratios]])
    inputs = {
        "logprobs": torch.full_like(lp, -1.3),
        "advantages": torch.tensor([advantages]),
        "weights": torch.full_like(lp, 0.5),
    }
    # lp - q must be exactly the log ratio chosen for the edges at r = 1.
    assert ((lp - inputs["logprobs"]) == 0).tolist() == [[x == 0 for x in log_ratios]]
    return lp, torch.ones_like(lp, dtype=torch.bool), inputs


# (where r is, sign of A, does ppo take the clipped term)
PPO_CASES = [
    ("above", +1.0, True),  # A > 0, r > hi: clipped, no gradient
    ("above", -1.0, False),  # A < 0, r > hi: unclipped, gradient -w * r * A
    ("below", +1.0, False),  # A > 0, r < lo: unclipped
    ("below", -1.0, True),  # A < 0, r < lo: clipped, no gradient
    ("inside", +1.0, False),
    ("inside", -1.0, False),
]


@pytest.mark.parametrize(("where", "adv", "clipped"), PPO_CASES)
def test_ppo_branch_outside_and_inside_the_clip(where, adv, clipped):
    lp, mask, inputs = edge_batch([LOG_R[where]], [adv])
    cfg = config_for("ppo")  # 0.8, 1.2
    result, grad = run("ppo", lp, mask, inputs, cfg)
    r = math.exp(LOG_R[where])
    expected_grad = 0.0 if clipped else -0.5 * r * adv
    assert grad.item() == pytest.approx(expected_grad, rel=1e-6, abs=0.0)
    assert (grad.item() == 0.0) == clipped
    obj = _clip(r, 0.8, 1.2) * adv if clipped else r * adv
    assert result.loss.item() == pytest.approx(-0.5 * obj, rel=1e-6)
    assert result.metrics["clip_fraction:mean"] == float(clipped)


@pytest.mark.parametrize("edge", ["lo", "hi"])
@pytest.mark.parametrize("adv", [+1.0, -1.0])
def test_ppo_at_exactly_the_edge_uses_the_unclipped_gradient(edge, adv):
    lp, mask, inputs = edge_batch([0.0], [adv])  # r == 1.0 exactly
    lo, hi = (1.0, 2.0) if edge == "lo" else (0.5, 1.0)
    cfg = config_for("ppo", clip_low_threshold=lo, clip_high_threshold=hi)
    result, grad = run("ppo", lp, mask, inputs, cfg)
    assert grad.item() == -0.5 * 1.0 * adv
    assert result.loss.item() == -0.5 * adv
    assert result.metrics["clip_fraction:mean"] == 0.0  # clipped == unclipped: not active


@pytest.mark.parametrize("adv", [+1.0, -1.0])
def test_cispo_gradient_is_clipped_ratio_times_advantage_everywhere(adv):
    keys = ["below", "inside", "above"]
    lp, mask, inputs = edge_batch([LOG_R[k] for k in keys], [adv] * 3)
    result, grad = run("cispo", lp, mask, inputs, config_for("cispo"))
    coefs = [_clip(math.exp(LOG_R[k]), 0.8, 1.2) for k in keys]  # 0.8, 1.0, 1.2
    torch.testing.assert_close(grad, torch.tensor([[-0.5 * c * adv for c in coefs]]))
    # Had the gradient flowed through r as well, it would carry an extra term r * lp * A.
    assert result.metrics["clip_fraction:mean"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("edge", ["lo", "hi"])
@pytest.mark.parametrize("adv", [+1.0, -1.0])
def test_cispo_at_exactly_the_edge(edge, adv):
    lp, mask, inputs = edge_batch([0.0], [adv])
    lo, hi = (1.0, 2.0) if edge == "lo" else (0.5, 1.0)
    cfg = config_for("cispo", clip_low_threshold=lo, clip_high_threshold=hi)
    result, grad = run("cispo", lp, mask, inputs, cfg)
    assert grad.item() == -0.5 * 1.0 * adv
    assert result.loss.item() == pytest.approx(-0.5 * lp.item() * adv, rel=1e-7)
    assert result.metrics["clip_fraction:mean"] == 0.0  # r on the edge is not outside


def test_cispo_gradient_does_not_flow_through_the_ratio():
    # With lp far from 0, a gradient through r would differ a lot from clip(r) * A.
    lp, mask, inputs = edge_batch([0.1], [1.0])
    lp = lp - 5.0
    inputs["logprobs"] = inputs["logprobs"] - 5.0
    _, grad = run("cispo", lp, mask, inputs, config_for("cispo"))
    r = math.exp(lp.item() - inputs["logprobs"].item())
    assert grad.item() == pytest.approx(-0.5 * r, rel=1e-5)


# --- garbage at padding --------------------------------------------------------------------------


@pytest.mark.parametrize("name", RL_LOSSES)
@pytest.mark.parametrize("garbage", [math.nan, math.inf, -math.inf])
def test_garbage_at_padding_does_not_leak(name, garbage):
    lp, mask, inputs = random_batch(11)
    assert (~mask).any()
    cfg = config_for(name)
    dirty = {k: torch.where(mask, v, garbage) for k, v in inputs.items()}
    dirty_lp = torch.where(mask, lp, garbage)
    result, grad = run(name, dirty_lp, mask, dirty, cfg)
    clean, clean_grad = run(name, lp, mask, inputs, cfg)

    assert torch.isfinite(result.loss) and torch.isfinite(grad).all()
    assert torch.isfinite(result.elementwise).all()
    assert (grad[~mask] == 0).all() and (result.elementwise[~mask] == 0).all()
    assert result.loss.item() == clean.loss.item()
    assert torch.equal(grad, clean_grad)
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert result.metrics == clean.metrics


@pytest.mark.parametrize("name", RL_LOSSES)
def test_all_padding_gives_zero_loss_and_finite_metrics(name):
    lp, _, inputs = random_batch(2)
    mask = torch.zeros(B, T, dtype=torch.bool)
    result, grad = run(name, lp, mask, inputs, config_for(name))
    assert result.loss.item() == 0.0 and (grad == 0).all()
    assert all(v == 0.0 for v in result.metrics.values())


# --- metrics -------------------------------------------------------------------------------------


def test_k3_kl_is_zero_on_policy_and_positive_off_policy():
    lp, mask, inputs = random_batch(6)
    on_policy = {**inputs, "logprobs": lp.clone()}
    m = compute_loss("importance_sampling", lp, mask, on_policy, {}).metrics
    assert m["ratio:mean"] == 1.0 and m["kl_sampler_learner:mean"] == 0.0
    assert m["logprob_diff_abs:mean"] == 0.0
    off = compute_loss("importance_sampling", lp, mask, inputs, {}).metrics
    assert off["kl_sampler_learner:mean"] > 0.0


def test_k3_kl_is_accurate_for_tiny_differences():
    # r - 1 - log r ~ (log r)^2 / 2 = 5e-9 here; a naive float32 (r - 1) would lose it.
    lp, mask, inputs = edge_batch([0.0], [1.0])
    inputs["logprobs"] = torch.zeros_like(lp)
    lp = torch.full_like(lp, 1e-4)
    m = compute_loss("importance_sampling", lp, mask, inputs, {}).metrics
    assert m["kl_sampler_learner:mean"] == pytest.approx(0.5e-8, rel=1e-3)


def test_cross_entropy_unchanged():
    lp, mask, inputs = random_batch(8)
    result = compute_loss("cross_entropy", lp, mask, {"weights": inputs["weights"]}, {})
    expected = sum(
        -w * x
        for w, x, m in zip(
            inputs["weights"].flatten().tolist(),
            lp.flatten().tolist(),
            mask.flatten().tolist(),
            strict=True,
        )
        if m
    )
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)
    assert result.metrics == {}
