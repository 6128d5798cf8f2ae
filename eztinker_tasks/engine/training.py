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
from eztinker_tasks.engine.logprobs import target_logprobs
from eztinker_tasks.engine.progress import Ticker
from eztinker_tasks.engine.runs import RunState
from eztinker_tasks.errors import InvalidRequest
from eztinker_tasks.types import AdamParams, ForwardBackwardOutput, OptimStepOutput, ProgressFn


def run_loss(
    model: nn.Module,
    batch: Batch,
    loss_fn: str,
    config: Mapping[str, float],
    *,
    backward: bool,
    chunk_elements: int,
    group_sizes: Sequence[int] | None = None,
    progress: ProgressFn | None = None,
) -> list[ForwardBackwardOutput]:
    """Forward the batch, compute the loss and (if ``backward``) accumulate gradients.

    ``group_sizes`` splits the batch's rows into consecutive groups (operations coalesced into
    one pass); each group gets its own loss, metrics and outputs, exactly as if it had been a
    call of its own, and the gradient is that of the sum of the group losses. Default: one
    group. ``progress`` gets the ``forward`` and (with ``backward``) ``backward`` phases.
    """
    sizes = list(group_sizes) if group_sizes is not None else [len(batch.lengths)]
    if sum(sizes) != len(batch.lengths) or min(sizes) < 1:
        raise ValueError(f"group sizes {sizes} do not split a batch of {len(batch.lengths)}")
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    ticker = Ticker(progress)
    ticker.phase("forward", tokens_total=batch.num_tokens, sequences=len(batch.lengths))
    with torch.set_grad_enabled(backward):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        lp = target_logprobs(out.logits, batch.targets, chunk_elements)
        lp = lp.masked_fill(~batch.mask, 0.0)
        results = []
        for a, b in itertools.pairwise(bounds):
            inputs = {key: value[a:b] for key, value in batch.inputs.items()}
            results.append(losses.compute_loss(loss_fn, lp[a:b], batch.mask[a:b], inputs, config))
        if backward:
            ticker.phase("backward", tokens_total=batch.num_tokens, sequences=len(batch.lengths))
            total = results[0].loss
            for result in results[1:]:
                total = total + result.loss
            total.backward()
    # One device-to-host copy for everything the caller gets back.
    flat = torch.cat(
        [
            lp.detach().flatten(),
            *(r.elementwise.detach().float().flatten() for r in results),
            torch.stack([r.loss.detach().float() for r in results]),
        ]
    ).cpu()
    size = lp.numel()
    lp_rows, loss_rows = flat[:size].view(lp.shape), flat[size : 2 * size].view(lp.shape)
    group_losses = flat[2 * size :].tolist()
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


def check_adam_params(params: AdamParams) -> None:
    """Raise InvalidRequest for hyper-parameters AdamW would reject or that make no sense."""
    checks = {
        "learning_rate": params.learning_rate >= 0,
        "beta1": 0 <= params.beta1 < 1,
        "beta2": 0 <= params.beta2 < 1,
        "eps": params.eps >= 0,
        "weight_decay": params.weight_decay >= 0,
        "grad_clip_norm": params.grad_clip_norm >= 0,
    }
    for key, ok in checks.items():
        value = getattr(params, key)
        if not ok or not math.isfinite(value):
            raise InvalidRequest(
                f"adam_params.{key} = {value!r} is out of range", errors={key: ["out of range"]}
            )


def optim_step(run: RunState, params: AdamParams) -> OptimStepOutput:
    """Clip (optional), AdamW-update the run's adapter, zero its gradients (set_to_none)."""
    tensors = list(run.params.values())
    grads = [p.grad for p in tensors if p.grad is not None]
    total = None
    if grads:
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
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
    # Read the norm only now, so the device never waits for the host inside the step.
    grad_norm = 0.0 if total is None else float(total)
    return OptimStepOutput(
        metrics={
            "step": float(run.step),
            "grad_norm": grad_norm,
            "learning_rate": params.learning_rate,
        }
    )
