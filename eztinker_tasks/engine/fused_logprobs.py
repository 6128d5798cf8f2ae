"""Target log-probabilities straight from the hidden states: the [tokens x vocab] logits of a
pass never exist at once.

``unembed_logprobs(hidden, weight, bias, targets, segments)`` returns float32
``log_softmax(hidden @ W^T + b + LoRA)[target]`` per row. It works in row chunks: each chunk's
logits are computed, turned into the target's logprob and dropped; the backward recomputes
them per chunk and writes d lp / d hidden (and the unembedding LoRA's gradients) directly, with
d lp / d logits = onehot(target) - softmax (the log-softmax derivative). Peak extra memory is one
chunk of logits, whatever the vocabulary.

Each segment of rows may carry its own unembedding LoRA (``A`` [r, d], ``B`` [V, r], scale):
logits = h W^T + scale * (h A^T) B^T, as ``MultiLoraLinear`` computes it; the frozen ``W`` gets
no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class UnembedSegment:
    """Rows [start, stop) of the pass, with their unembedding LoRA (or none)."""

    start: int
    stop: int
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None  # (A [r, d], B [V, r], scale)


def _chunks(start: int, stop: int, step: int):
    for a in range(start, stop, step):
        yield a, min(stop, a + step)


class _UnembedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        layout: tuple[tuple[int, int, int], ...],  # (start, stop, index of A in loras or -1)
        scales: tuple[float, ...],
        step: int,
        *loras: torch.Tensor,  # A0, B0, A1, B1, ...
    ) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for start, stop, li in layout:
                lora = None if li < 0 else (loras[2 * li], loras[2 * li + 1], scales[li])
                for a, b in _chunks(start, stop, step):
                    logits = _logits(hidden[a:b], weight, bias, lora)
                    lp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
                    out[a:b] = lp.gather(1, targets[a:b, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, bias, targets, *loras)
        ctx.layout, ctx.scales, ctx.step, ctx.has_bias = layout, scales, step, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_lp,) = grad_outputs
        hidden, weight, bias, targets, *loras = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_loras = [torch.zeros_like(t) if t.requires_grad else None for t in loras]
        grad_lp = grad_lp.float()
        for start, stop, li in ctx.layout:
            lora = None if li < 0 else (loras[2 * li], loras[2 * li + 1], ctx.scales[li])
            for a, b in _chunks(start, stop, ctx.step):
                h = hidden[a:b]
                with torch.no_grad():
                    logits = _logits(h, weight, bias, lora)
                    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
                    index = targets[a:b, None]
                    g = grad_lp[a:b, None]
                    # d lp / d logits = onehot - softmax, times the incoming gradient.
                    dlogits = probs.mul_(-g)
                    dlogits.scatter_add_(1, index, g.expand_as(index).to(dlogits.dtype))
                    dl = dlogits.to(h.dtype)
                    if grad_hidden is not None:
                        grad_hidden[a:b] = dl @ weight
                    if lora is not None:
                        la, lb, scale = lora
                        la_, lb_ = la.to(h.dtype), lb.to(h.dtype)
                        du = (dl @ lb_) * scale  # d lp / d (h A^T), [rows, r]
                        if grad_hidden is not None:
                            grad_hidden[a:b] += du @ la_
                        ga, gb = grad_loras[2 * li], grad_loras[2 * li + 1]
                        if ga is not None:
                            ga += (du.t() @ h).to(ga.dtype)
                        if gb is not None:
                            gb += ((dl.t() @ (h @ la_.t())) * scale).to(gb.dtype)
        return (grad_hidden, None, None, None, None, None, None, *grad_loras)


def _logits(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None,
) -> torch.Tensor:
    logits = h @ weight.t()
    if bias is not None:
        logits = logits + bias
    if lora is not None:
        la, lb, scale = lora
        logits = logits + ((h @ la.to(h.dtype).t()) @ lb.to(h.dtype).t()) * scale
    return logits


def unembed_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    segments: Sequence[UnembedSegment],
    chunk_elements: int,
) -> torch.Tensor:
    """float32 log_softmax(hidden @ weight^T + bias + LoRA)[targets]: [N, d] -> [N].

    ``weight`` is [V, d] (frozen: it gets no gradient); ``segments`` must cover the rows in
    order. ``chunk_elements`` bounds one chunk's logits (rows x V).
    """
    loras: list[torch.Tensor] = []
    scales: list[float] = []
    layout: list[tuple[int, int, int]] = []
    for seg in segments:
        if seg.lora is None:
            layout.append((seg.start, seg.stop, -1))
            continue
        a, b, scale = seg.lora
        layout.append((seg.start, seg.stop, len(scales)))
        loras += [a, b]
        scales.append(scale)
    step = max(1, chunk_elements // max(1, weight.shape[0]))
    out = _UnembedLogprob.apply(
        hidden, weight, bias, targets, tuple(layout), tuple(scales), step, *loras
    )
    assert isinstance(out, torch.Tensor)
    return out
