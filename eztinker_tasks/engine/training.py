"""The training math: one batched forward (and backward) pass, and the AdamW step.

``run_loss`` does ONE forward pass over the whole padded batch, computes float32 target
logprobs (``logprobs.target_logprobs``), calls the registered loss (``losses.compute_loss``,
a SUM over tokens and datums) and, for ``forward_backward``, back-propagates into the active
adapter's ``.grad`` (which accumulates until ``optim_step``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from eztinker_tasks.engine import losses
from eztinker_tasks.engine.batching import Batch
from eztinker_tasks.engine.finite import GradientStash, check_finite_norm, describe_non_finite
from eztinker_tasks.engine.logprobs import target_logprobs
from eztinker_tasks.engine.runs import RunState
from eztinker_tasks.types import AdamParams, ForwardBackwardOutput, OptimStepOutput


def run_loss(
    model: nn.Module,
    batch: Batch,
    loss_fn: str,
    config: Mapping[str, float],
    *,
    backward: bool,
    chunk_elements: int,
    params: Sequence[torch.Tensor] = (),
    group_sizes: Sequence[int] | None = None,
    op: str = "forward_backward",
) -> list[ForwardBackwardOutput]:
    """Forward the batch, compute the loss and (if ``backward``) accumulate gradients.

    ``group_sizes`` splits the batch's rows into consecutive groups (operations coalesced into
    one pass); each group gets its own loss, metrics and outputs, exactly as if it had been a
    call of its own, and the gradient is that of the sum of the group losses. Default: one
    group. ``params`` are the trainable tensors whose ``.grad`` accumulates.

    Raises ``NonFiniteValue`` (nothing applied: the accumulated gradient of ``params`` is
    exactly as before the call) when a loss or a gradient is NaN or inf.
    """
    sizes = list(group_sizes) if group_sizes is not None else [len(batch.lengths)]
    if sum(sizes) != len(batch.lengths) or min(sizes) < 1:
        raise ValueError(f"group sizes {sizes} do not split a batch of {len(batch.lengths)}")
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    stash = GradientStash(params) if backward else None
    with torch.set_grad_enabled(backward):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        lp = target_logprobs(out.logits, batch.targets, chunk_elements)
        lp = lp.masked_fill(~batch.mask, 0.0)
        results = []
        for a, b in itertools.pairwise(bounds):
            inputs = {key: value[a:b] for key, value in batch.inputs.items()}
            results.append(losses.compute_loss(loss_fn, lp[a:b], batch.mask[a:b], inputs, config))
        total = results[0].loss
        for result in results[1:]:
            total = total + result.loss
        finite = torch.isfinite(total)
        if stash is not None:
            if lp.requires_grad:
                lp.retain_grad()
            total.backward()
            grads_finite = stash.finite_flag()
            if grads_finite is not None:
                finite = finite & grads_finite
    # One device-to-host copy for everything the caller gets back (and the finiteness verdict).
    flat = torch.cat(
        [
            lp.detach().flatten(),
            *(r.elementwise.detach().float().flatten() for r in results),
            torch.stack([r.loss.detach().float() for r in results]),
            finite.float().reshape(1),
        ]
    ).cpu()
    size = lp.numel()
    lp_rows, loss_rows = flat[:size].view(lp.shape), flat[size : 2 * size].view(lp.shape)
    group_losses = flat[2 * size : -1].tolist()
    if not bool(flat[-1]):
        if stash is not None:
            stash.rollback()
        grad = lp.grad.detach().float().cpu().numpy() if lp.grad is not None else None
        raise describe_non_finite(
            op,
            loss_fn,
            batch.lengths,
            bounds[:-1],
            loss_rows.numpy(),
            lp_rows.numpy(),
            grad,
            {key: value.detach().float().cpu().numpy() for key, value in batch.inputs.items()},
            loss_finite=all(math.isfinite(x) for x in group_losses),
        )
    if stash is not None:
        stash.commit()
    outputs = []
    for (a, b), result, loss in zip(itertools.pairwise(bounds), results, group_losses, strict=True):
        lengths = batch.lengths[a:b]
        outputs.append(
            ForwardBackwardOutput(
                loss_fn_outputs=[
                    {
                        "logprobs": lp_rows[row, :n].tolist(),
                        "elementwise_loss": loss_rows[row, :n].tolist(),
                    }
                    for row, n in zip(range(a, b), lengths, strict=True)
                ],
                metrics={
                    "loss:sum": float(loss),
                    "num_tokens:sum": float(sum(lengths)),
                    "num_sequences:sum": float(len(lengths)),
                    **{k: float(v) for k, v in result.metrics.items()},
                },
            )
        )
    return outputs


def optim_step(run: RunState, params: AdamParams) -> OptimStepOutput:
    """Clip (optional), AdamW-update the run's adapter, zero its gradients (set_to_none).

    Raises ``NonFiniteValue`` and changes nothing if the accumulated gradient is not finite.
    """
    tensors = list(run.params.values())
    grads = [p.grad for p in tensors if p.grad is not None]
    total = None
    if grads:
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        check_finite_norm(total, f"optim_step of run {run.run_id}")
        if params.grad_clip_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(tensors, params.grad_clip_norm, total)
    for group in run.optimizer.param_groups:
        group["lr"] = params.learning_rate
        group["betas"] = (params.beta1, params.beta2)
        group["eps"] = params.eps
        group["weight_decay"] = params.weight_decay
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    grad_norm = 0.0 if total is None else float(total)
    return OptimStepOutput(
        metrics={
            "step": float(run.step),
            "grad_norm": grad_norm,
            "learning_rate": params.learning_rate,
        }
    )
