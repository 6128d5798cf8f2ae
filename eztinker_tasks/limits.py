"""Numeric limits of requests: one rule for each value, checked at submit AND in the engine.

Torch-free, so the web process refuses at once (4xx) exactly what the engine would refuse,
and every value that passes can be computed with: a value that passes here never turns into
NaN/inf inside the arithmetic (which would come back as a ``server`` error, or worse, reach the
weights). Each function raises ``InvalidRequest`` naming the field.
"""

from __future__ import annotations

import math

from eztinker_tasks.errors import InvalidRequest
from eztinker_tasks.types import AdamParams, LoraSpec, SamplingParams

# torch.Generator.manual_seed takes any integer in [-2**63, 2**64); others raise.
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1
# LoRA init seeds are also offset by the step when a state is restored: keep them well inside.
MAX_LORA_SEED = 2**63 - 1
MAX_RANK = 1024
MAX_TOP_LOGPROBS = 20  # as OpenAI's API
# alpha / rank scales the LoRA delta in float32: a huge alpha makes 0 * inf = NaN at init.
MAX_ALPHA = 1e6
# The smallest normal float32: a smaller eps is 0 (or denormal, flushed to 0 on GPUs) inside
# AdamW's denominator, and a parameter whose gradient is 0 then gets 0 / 0 = NaN.
MIN_EPS = 1.1754943508222875e-38
# Far above any learning rate that trains (LoRA uses ~1e-5 to 1e-2); bounds AdamW's step so
# the weights stay finite.
MAX_LEARNING_RATE = 1e3


def _invalid(message: str, key: str) -> InvalidRequest:
    return InvalidRequest(message, errors={key: [message]})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_adam_params(params: AdamParams) -> None:
    """AdamW hyper-parameters: finite, in AdamW's domain, and with a finite update."""
    checks = {
        "learning_rate": (
            0 <= params.learning_rate <= MAX_LEARNING_RATE,
            f"in [0, {MAX_LEARNING_RATE:g}]",
        ),
        "beta1": (0 <= params.beta1 < 1, "in [0, 1)"),
        "beta2": (0 <= params.beta2 < 1, "in [0, 1)"),
        "eps": (params.eps >= MIN_EPS, f">= {MIN_EPS:.4g} (float32's smallest normal number)"),
        "weight_decay": (params.weight_decay >= 0, ">= 0"),
        "grad_clip_norm": (params.grad_clip_norm >= 0, ">= 0 (0 = no clipping)"),
    }
    for key, (ok, rule) in checks.items():
        value = getattr(params, key)
        if not _is_number(value) or not math.isfinite(value) or not ok:
            raise _invalid(f"adam_params.{key} = {value!r} is out of range: must be {rule}", key)
    if params.learning_rate * params.weight_decay > 1:
        raise _invalid(
            f"adam_params: learning_rate * weight_decay = "
            f"{params.learning_rate * params.weight_decay:.3g} is over 1 (decoupled weight decay "
            "multiplies each weight by 1 - lr * wd, which would flip its sign)",
            "weight_decay",
        )


def check_seed(seed: object, key: str = "seed") -> None:
    """A sampling seed: null, or an integer torch's generator takes ([-2**63, 2**64))."""
    if seed is None:
        return
    if not isinstance(seed, int) or isinstance(seed, bool) or not MIN_SEED <= seed <= MAX_SEED:
        raise _invalid(f"{key} must be an integer in [-2**63, 2**64) or null", key)


def check_sampling_params(params: SamplingParams) -> None:
    """temperature >= 0 (0 = greedy), top_p in (0, 1], top_k -1 or >= 1, seed in range."""
    if not _is_int(params.max_tokens) or params.max_tokens < 1:
        raise _invalid("max_tokens must be a positive integer", "max_tokens")
    if not _is_number(params.temperature) or not math.isfinite(params.temperature):
        raise _invalid("temperature must be a finite number >= 0", "temperature")
    if params.temperature < 0:
        raise _invalid("temperature must be a finite number >= 0", "temperature")
    if not _is_number(params.top_p) or not math.isfinite(params.top_p) or not 0 < params.top_p <= 1:
        raise _invalid("top_p must be in (0, 1]", "top_p")
    if not _is_int(params.top_k) or (params.top_k != -1 and params.top_k < 1):
        raise _invalid("top_k must be -1 (off) or a positive integer", "top_k")
    check_seed(params.seed)
    k = params.top_logprobs
    if not _is_int(k) or not 0 <= k <= MAX_TOP_LOGPROBS:
        raise _invalid(
            f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs"
        )


def check_lora_spec(lora: LoraSpec) -> None:
    """rank in [1, 1024], alpha in (0, 1e6] or null, something to train, seed in [0, 2**63)."""
    if not _is_int(lora.rank):
        raise _invalid("lora.rank must be an integer", "rank")
    if not 1 <= lora.rank <= MAX_RANK:
        raise _invalid(f"lora.rank must be in [1, {MAX_RANK}]", "rank")
    alpha = lora.alpha
    if alpha is not None and (
        not _is_number(alpha) or not math.isfinite(alpha) or not 0 < alpha <= MAX_ALPHA
    ):
        raise _invalid(f"lora.alpha must be a number in (0, {MAX_ALPHA:g}]", "alpha")
    if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
        raise _invalid("lora must train at least one of attn, mlp, unembed", "lora")
    seed = lora.seed
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_LORA_SEED):
        raise _invalid("lora.seed must be an integer in [0, 2**63)", "seed")
