"""What each built-in loss needs: required per-token inputs and allowed config keys.

Torch-free, so the web layer validates requests with the same table the engine uses.
The loss functions themselves live in ``eztinker_tasks.engine.losses``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eztinker_tasks.errors import InvalidRequest

REQUIRED = None  # marks a config key that has no default


@dataclass(frozen=True)
class LossSpec:
    name: str
    doc: str
    required_inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...]
    config: Mapping[str, float | None]  # key -> default (REQUIRED = must be given)


LOSS_SPECS: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec(
            "cross_entropy",
            "sum(-weights * logprob(target)); weights default to 1.",
            ("target_tokens",),
            ("weights",),
            {},
        ),
        LossSpec(
            "importance_sampling",
            "sum(-r * A) with r = exp(lp - q), q the sampler's logprobs.",
            ("target_tokens", "logprobs", "advantages"),
            ("weights",),
            {},
        ),
        LossSpec(
            "ppo",
            "sum(-min(r * A, clip(r, lo, hi) * A)).",
            ("target_tokens", "logprobs", "advantages"),
            ("weights",),
            {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
        ),
        LossSpec(
            "cispo",
            "sum(-stopgrad(clip(r, lo, hi)) * lp * A).",
            ("target_tokens", "logprobs", "advantages"),
            ("weights",),
            {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
        ),
        LossSpec(
            "dro",
            "sum(-(lp * A - 0.5 * beta * (lp - q)^2)).",
            ("target_tokens", "logprobs", "advantages"),
            ("weights",),
            {"beta": REQUIRED},
        ),
    )
}


# float32's largest finite value: loss inputs are float32 on the worker, so a larger number
# (finite in JSON's float64) would arrive as inf.
FLOAT32_MAX = 3.4028234663852886e38
# A log-probability is <= 0; a little above 0 is accepted as rounding in the sampler.
MAX_LOGPROB = 1e-3


def input_bounds(key: str) -> tuple[float, float]:
    """The closed range [lo, hi] every value of loss input ``key`` must lie in.

    NaN and inf lie in none. ``logprobs`` (the sampler's) must be <= ``MAX_LOGPROB``; any very
    negative placeholder (-100, -1e9) is fine at positions whose weight is 0, which never enter
    the arithmetic.
    """
    if key == "logprobs":
        return -FLOAT32_MAX, MAX_LOGPROB
    return -FLOAT32_MAX, FLOAT32_MAX


def first_out_of_bounds(key: str, values: Sequence[float]) -> int | None:
    """Index of the first value of input ``key`` outside ``input_bounds(key)`` (NaN too)."""
    lo, hi = input_bounds(key)
    for i, x in enumerate(values):
        if not lo <= x <= hi:  # False for NaN
            return i
    return None


def bounds_message(key: str, index: int, value: float) -> str:
    hi = input_bounds(key)[1]
    if value != value or value in (float("inf"), float("-inf")):
        return f"{key}[{index}] is {value}: NaN and inf are not allowed"
    if key == "logprobs" and value > hi:
        return f"{key}[{index}] = {value!r} is a log-probability above 0"
    return f"{key}[{index}] = {value!r} is outside float32's range"


def get_loss_spec(name: str) -> LossSpec:
    try:
        return LOSS_SPECS[name]
    except KeyError:
        known = ", ".join(sorted(LOSS_SPECS))
        raise InvalidRequest(
            f"unknown loss_fn {name!r}; known: {known}", errors={"loss_fn": [f"unknown: {name}"]}
        ) from None


def resolve_loss_config(spec: LossSpec, config: Mapping[str, Any] | None) -> dict[str, float]:
    """Validate ``config`` against ``spec`` and fill defaults; raises InvalidRequest."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(spec.config))
    if unknown:
        allowed = ", ".join(sorted(spec.config)) or "none"
        raise InvalidRequest(
            f"unknown loss_fn_config key(s) {unknown} for {spec.name!r}; allowed: {allowed}",
            errors={"loss_fn_config": [f"unknown key: {k}" for k in unknown]},
        )
    out: dict[str, float] = {}
    for key, default in spec.config.items():
        value = config.get(key, default)
        if value is None:
            raise InvalidRequest(
                f"loss_fn {spec.name!r} needs loss_fn_config[{key!r}]",
                errors={"loss_fn_config": [f"missing required key: {key}"]},
            )
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InvalidRequest(
                f"loss_fn_config[{key!r}] must be a number, got {value!r}",
                errors={"loss_fn_config": [f"not a number: {key}"]},
            ) from None
        if number != number or number in (float("inf"), float("-inf")):
            raise InvalidRequest(
                f"loss_fn_config[{key!r}] must be finite",
                errors={"loss_fn_config": [f"not finite: {key}"]},
            )
        out[key] = number
    if "clip_low_threshold" in out and out["clip_low_threshold"] > out["clip_high_threshold"]:
        raise InvalidRequest(
            "clip_low_threshold must be <= clip_high_threshold",
            errors={"loss_fn_config": ["clip_low_threshold > clip_high_threshold"]},
        )
    return out


def check_loss_inputs(spec: LossSpec, present: set[str]) -> None:
    """Raise InvalidRequest naming every required input missing from a datum."""
    missing = [k for k in spec.required_inputs if k not in present]
    if missing:
        raise InvalidRequest(
            f"loss_fn {spec.name!r} needs loss_fn_inputs {missing}",
            errors={"loss_fn_inputs": [f"missing: {k}" for k in missing]},
        )
    unknown = sorted(present - set(spec.required_inputs) - set(spec.optional_inputs))
    if unknown:
        raise InvalidRequest(
            f"loss_fn {spec.name!r} does not take loss_fn_inputs {unknown}",
            errors={"loss_fn_inputs": [f"unknown: {k}" for k in unknown]},
        )
