"""The AdamW step of a run (the forward and backward passes are ``passes.run_pass``)."""

from __future__ import annotations

import torch

from eztinker_tasks.engine.finite import check_finite_norm
from eztinker_tasks.engine.runs import RunState
from eztinker_tasks.types import AdamParams, OptimStepOutput


def optim_step(run: RunState, params: AdamParams) -> OptimStepOutput:
    """Clip (optional), AdamW-update the run's adapter, zero its gradients (set_to_none).

    Raises ``NonFiniteValue`` and changes nothing if the accumulated gradient is not finite.
    """
    tensors = run.leaves
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
