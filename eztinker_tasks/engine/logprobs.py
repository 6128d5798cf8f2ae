"""Log-probabilities of target tokens, computed without full float32 copies of the logits.

``target_logprobs(logits, targets)`` returns ``log_softmax(logits)[target]`` in float32 for
logits of any float dtype. It is an autograd function that works in row chunks: the forward
runs a fused ``log_softmax(..., dtype=float32)`` per chunk and keeps only the picked values; the
backward recomputes ``softmax`` per chunk and writes ``d lp / d logits = onehot - softmax``
(times the incoming gradient) straight into a gradient of the logits' dtype. Peak extra memory
is one float32 chunk instead of the two full float32 [B, T, V] tensors that
``log_softmax(logits.float())`` keeps for its backward.
"""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_CHUNK_ELEMENTS = 1 << 27


def _row_chunk(vocab: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, vocab))


class _TargetLogprob(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, targets: torch.Tensor, chunk_elements: int
    ) -> torch.Tensor:
        rows, vocab = logits.shape
        step = _row_chunk(vocab, chunk_elements)
        out = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            chunk = torch.log_softmax(logits[start:stop], dim=-1, dtype=torch.float32)
            out[start:stop] = chunk.gather(1, targets[start:stop].unsqueeze(1)).squeeze(1)
        ctx.save_for_backward(logits, targets)
        ctx.step = step
        return out

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (grad_lp,) = grad_outputs
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        grad_lp = grad_lp.float()
        for start in range(0, logits.shape[0], ctx.step):
            stop = min(logits.shape[0], start + ctx.step)
            g = grad_lp[start:stop].unsqueeze(1)
            index = targets[start:stop].unsqueeze(1)
            probs = torch.softmax(logits[start:stop], dim=-1, dtype=torch.float32)
            at_target = (1.0 - probs.gather(1, index)) * g  # onehot - softmax at the target
            torch.mul(probs, g.neg(), out=grad[start:stop])
            grad[start:stop].scatter_(1, index, at_target.to(grad.dtype))
        return grad, None, None


def target_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> torch.Tensor:
    """float32 ``log_softmax(logits)[..., targets]`` for logits [..., V] and targets [...]."""
    shape = targets.shape
    flat = _TargetLogprob.apply(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), chunk_elements
    )
    assert isinstance(flat, torch.Tensor)
    return flat.view(shape)
