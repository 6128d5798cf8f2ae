"""The decode batch's KV cache and the attention that reads and writes it.

``KV_ATTENTION`` is registered with transformers' ``AttentionInterface``: a model switched to
it (``kv_attention_on``) runs its own layers unchanged, and its attention layers take their
keys and values from the cache of the ``KVStep`` passed down the forward's keyword arguments
(``eztinker_kv=``). Per layer the cache holds keys and values [rows, kv_heads, length,
head_dim] in the model's dtype, allocated on first use and zeroed.

- prefill: the prompts come packed in one row; causal attention per prompt (FlashAttention-2
  varlen on CUDA, SDPA per prompt elsewhere: ``engine.attention``), and each prompt's keys and
  values are written into the cache rows of all its samples;
- decode: one token per row; each row's new key and value are written at its position, then
  one SDPA call attends every row over its own cache row (a length mask where rows differ in
  position; none where all are aligned, so SDPA may use its fused kernels).

The budget helpers (``kv_bytes_per_token``, ``check_kv_fits``) size a batch's cache before
anything runs, so a batch too large is a ``user`` error, never an out-of-memory crash.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from eztinker_tasks.engine.attention import (
    _sdpa_loop,
    _varlen_call,
    attention_implementation,
    no_mask,
)
from eztinker_tasks.errors import InvalidRequest
from eztinker_tasks.types import SamplingParams

KV_ATTENTION = "eztinker_kv"
KV_HEADROOM = 0.8  # share of the free device memory one batch's KV cache may take


class Sized(Protocol):
    """What the budget needs of a request: its prompt, samples and sampling parameters."""

    prompt: list[int]
    num_samples: int
    params: SamplingParams


def kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes of keys and values one token of one sequence keeps, over all layers."""
    config: Any = getattr(model, "config")  # noqa: B009
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0))
    kv_heads = int(getattr(config, "num_key_value_heads", 0) or heads)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    head_dim = int(getattr(config, "head_dim", 0) or hidden // max(1, heads))
    size = torch.finfo(next(model.parameters()).dtype).bits // 8
    return 2 * layers * kv_heads * head_dim * size


def kv_rows_and_length(requests: Sequence[Sized]) -> tuple[int, int]:
    """The KV cache a batch needs: (rows, positions per row)."""
    rows = sum(r.num_samples for r in requests)
    length = max(len(r.prompt) + r.params.max_tokens for r in requests)
    return rows, length


def check_kv_fits(model: nn.Module, requests: Sequence[Sized], free: int | None) -> None:
    """Raise a ``user`` error when the batch's KV cache would not fit in ``free`` bytes."""
    if free is None:
        return
    rows, length = kv_rows_and_length(requests)
    need = rows * length * kv_bytes_per_token(model)
    if need > KV_HEADROOM * free:
        raise InvalidRequest(
            f"sampling {rows} sequences of up to {length} tokens needs {need >> 20} MiB of KV "
            f"cache; {free >> 20} MiB are free: ask for fewer samples or fewer max_tokens",
            errors={"num_samples": ["over the KV-cache budget"]},
        )


@dataclass
class KVStep:
    """What one forward's attention layers need: the cache and where this forward's rows go."""

    cache: dict[int, tuple[torch.Tensor, torch.Tensor]]
    rows: int
    length: int
    prefill: bool
    # prefill: the packed prompts' bounds, and per written cache entry (row, position, source)
    cu: torch.Tensor | None = None
    max_len: int = 0
    bounds: list[int] = field(default_factory=list)
    write_rows: torch.Tensor | None = None
    write_pos: torch.Tensor | None = None
    write_src: torch.Tensor | None = None
    # decode: each input row's cache row and position, the mask over the cache length
    row_index: torch.Tensor | None = None
    row_slice: slice | None = None  # when the input rows are cache rows [a, b) in order
    positions: torch.Tensor | None = None
    span: int = 0
    mask: torch.Tensor | None = None

    def layer(self, idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``idx``'s (keys, values) [rows, kv_heads, length, head_dim], made on first use."""
        if idx not in self.cache:
            _, kv_heads, _, head_dim = like.shape
            shape = (self.rows, kv_heads, self.length, head_dim)
            # Zeros, not empty: masked positions still enter the matmuls (weight 0 times a
            # NaN left in uninitialised memory would be NaN).
            self.cache[idx] = (
                torch.zeros(shape, dtype=like.dtype, device=like.device),
                torch.zeros(shape, dtype=like.dtype, device=like.device),
            )
        return self.cache[idx]


def kv_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature over our cache: q [1, Hq, N, D] -> [1, N, Hq, D]."""
    step = kwargs.get("eztinker_kv")
    if not isinstance(step, KVStep):
        raise RuntimeError("KV attention runs only inside engine.decode")
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx")
    keys, values = step.layer(int(layer_idx), key)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, H, D]
    if step.prefill:
        assert step.cu is not None and step.write_src is not None
        keys[step.write_rows, :, step.write_pos] = k[step.write_src]
        values[step.write_rows, :, step.write_pos] = v[step.write_src]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = _varlen_call(q, k, v, step.cu, step.max_len, scale)
        if out is None:
            out = _sdpa_loop(q, k, v, step.bounds, scale)
        return out.unsqueeze(0), None
    keys[step.row_index, :, step.positions] = k
    values[step.row_index, :, step.positions] = v
    if step.row_slice is not None:
        ks, vs = keys[step.row_slice, :, : step.span], values[step.row_slice, :, : step.span]
    else:
        ks, vs = keys[step.row_index, :, : step.span], values[step.row_index, :, : step.span]
    out = nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2),  # [B, Hq, 1, D]
        ks,
        vs,
        attn_mask=step.mask,
        scale=scale,
        enable_gqa=q.shape[1] != ks.shape[1],
    )
    return out.squeeze(2).unsqueeze(0), None


AttentionInterface.register(KV_ATTENTION, kv_attention)
AttentionMaskInterface.register(KV_ATTENTION, no_mask)


def kv_attention_on(model: nn.Module) -> AbstractContextManager[None]:
    """Run ``model`` with ``kv_attention`` for the duration of the block."""
    return attention_implementation(model, KV_ATTENTION)
