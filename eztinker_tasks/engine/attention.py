"""Causal attention over packed sequences: no padding, and no sequence ever sees another.

A packed forward puts all sequences of a pass in one row ([1, N] tokens) with positions that
restart per sequence and ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32 cumulative lengths,
[S + 1]) passed through the model's keyword arguments, as transformers does for
FlashAttention. ``packed_attention`` is registered with transformers' ``AttentionInterface``
under ``PACKED``; ``packed(model)`` switches a model to it for one forward (its mask function
builds nothing: a dense block-diagonal mask would cost O(N^2) memory and send SDPA to its slow
path).

On CUDA the kernel is libtorch's FlashAttention-2 ``varlen_attn``; elsewhere (the CPU tests) a
loop over the sequences with causal SDPA. Both are checked against unpacked attention in the
tests.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Generator
from contextlib import AbstractContextManager, contextmanager
from functools import cache
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

PACKED = "eztinker_packed"


@cache
def _varlen() -> tuple[Any, frozenset[str]] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float
) -> torch.Tensor | None:
    """FlashAttention-2 over packed [N, H, D] tensors (causal), or None where unavailable."""
    found = _varlen()
    if found is None or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return None
    fn, params = found
    kwargs: dict[str, Any] = {"scale": scale}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:  # FlashAttention's (left, right) window: (-1, 0) is causal
        kwargs["window_size"] = (-1, 0)
    if "enable_gqa" in params and q.shape[1] != k.shape[1]:
        kwargs["enable_gqa"] = True
    out = fn(q, k, v, cu, cu, max_len, max_len, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q [1, Hq, N, D], k/v [1, Hkv, N, D] -> [1, N, Hq, D]."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        raise RuntimeError("packed attention needs one packed row and cu_seq_lens_q")
    max_len = int(kwargs.get("max_length_q") or 0)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [N, H, D]
    out = _varlen_call(q, k, v, cu, max_len, scale)
    if out is None:
        out = _sdpa_loop(q, k, v, [int(x) for x in cu.tolist()], scale)
    return out.unsqueeze(0), None


def _sdpa_loop(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], scale: float
) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for start, stop in itertools.pairwise(bounds):
        qs, ks, vs = (t[start:stop].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        o = nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa
        )
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def no_mask(*args: Any, **kwargs: Any) -> None:
    """A mask function that builds nothing: our attention functions mask for themselves."""
    return None


AttentionInterface.register(PACKED, packed_attention)
AttentionMaskInterface.register(PACKED, no_mask)


@contextmanager
def attention_implementation(model: nn.Module, name: str) -> Generator[None, None, None]:
    """Run ``model`` with the attention registered as ``name`` for the duration of the block."""
    config: Any = getattr(model, "config")  # noqa: B009
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def packed(model: nn.Module) -> AbstractContextManager[None]:
    """Run ``model`` with packed attention for the duration of the block."""
    return attention_implementation(model, PACKED)


def packed_kwargs(cu_seqlens: torch.Tensor, max_len: int) -> dict[str, Any]:
    """The keyword arguments a packed forward passes down to every attention layer."""
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": max_len,
        "max_length_k": max_len,
    }
