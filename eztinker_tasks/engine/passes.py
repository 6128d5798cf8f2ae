"""ONE packed forward (and backward) pass over the calls of any number of runs on one base.

A ``LossCall`` is one operation's work: a run, its validated datums, its loss. ``run_pass``
packs the datums of all calls into one row without padding (each run's rows contiguous), routes
each run's rows through its own adapter (``multilora``), keeps sequences apart with packed
attention (``attention``), computes the target logprobs from the hidden states without full
logits (``fused_logprobs``), then each call's loss (``losses``) on its own rows. With
``backward`` the sum of the calls' losses is back-propagated once: as the losses of different
runs share no parameter, each run's gradient is exactly that of its own loss.

Every call gets what a pass of its own would give (its outputs, metrics and gradient). A run
whose loss or gradient is not finite has its fresh gradient dropped (``finite``) and its calls
fail with ``NonFiniteValue``; the other runs' results stand. A run's calls that are not to
blame are run again without the guilty ones; where no call of a run shows the fault (an
overflow inside the model), its calls are run again one by one to find it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from eztinker_tasks.engine import lockstep, losses
from eztinker_tasks.engine.attention import packed, packed_kwargs
from eztinker_tasks.engine.batching import PackedBatch, Row, pack
from eztinker_tasks.engine.checkpointing import activation_checkpointing
from eztinker_tasks.engine.finite import GradientStash
from eztinker_tasks.engine.fused_logprobs import UnembedSegment, unembed_logprobs
from eztinker_tasks.engine.logprobs import target_logprobs
from eztinker_tasks.engine.models import LoadedBase
from eztinker_tasks.engine.multilora import LoraRoute, MultiLoraLinear, Segment
from eztinker_tasks.engine.pass_results import (
    PassStats,
    describe,
    layout_of,
    output,
    run_spans,
)
from eztinker_tasks.engine.progress import Ticker
from eztinker_tasks.engine.runs import RunState
from eztinker_tasks.errors import EZTinkerError, NonFiniteValue
from eztinker_tasks.types import ForwardBackwardOutput, ProgressFn

# Configs that post-process logits (soft-capping, scaling): such models get full logits.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class LossCall:
    """One operation's part of a pass."""

    run: RunState
    rows: list[Row]
    loss_fn: str
    config: dict[str, float]
    op: str = "forward_backward"  # for error messages


def run_pass(
    base: LoadedBase,
    calls: Sequence[LossCall],
    *,
    backward: bool,
    chunk_elements: int,
    checkpoint: bool = False,
    progress: ProgressFn | None = None,
) -> list[ForwardBackwardOutput | EZTinkerError]:
    """Run ``calls`` (all on ``base``) in one packed pass; one result or error per call.

    ``progress`` is told the ``forward`` and (with ``backward``) ``backward`` phases.
    """
    ticker = Ticker(progress)
    results: list[ForwardBackwardOutput | EZTinkerError | None] = [None] * len(calls)
    queue: list[list[int]] = [list(range(len(calls)))]
    while queue:  # each round settles or splits off at least one call: it ends
        group = queue.pop(0)
        outcome = _one_pass(
            base,
            [calls[i] for i in group],
            backward=backward,
            chunk_elements=chunk_elements,
            checkpoint=checkpoint,
            ticker=ticker,
        )
        again = []
        for i, value in zip(group, outcome, strict=True):
            if isinstance(value, _Innocent):
                again.append(i)  # its run's gradient was dropped for another call's fault
            elif isinstance(value, _Suspect):
                queue.append([i])  # alone, to learn whether it is the guilty one
            else:
                results[i] = value
        if again:
            queue.append(again)
    return [r for r in results if r is not None]


@dataclass
class _Suspect:
    """A call of a run whose gradient was not finite with no call of it showing why: it runs
    again alone (one of its run's calls is guilty, the others are innocent)."""


@dataclass
class _Innocent:
    """A call whose run failed the finiteness check because of another call of that run."""


def _one_pass(
    base: LoadedBase,
    calls: Sequence[LossCall],
    *,
    backward: bool,
    chunk_elements: int,
    checkpoint: bool,
    ticker: Ticker,
) -> list[ForwardBackwardOutput | EZTinkerError | _Innocent | _Suspect]:
    layout = layout_of(calls)
    rows = [row for i in layout.order for row in calls[i].rows]
    batch = pack(rows, base.device)
    size = {"tokens_total": batch.num_tokens, "sequences": len(batch.lengths)}
    ticker.phase("forward", **size)
    runs: dict[str, RunState] = {}
    for i in layout.order:
        runs.setdefault(calls[i].run.run_id, calls[i].run)
    spans = run_spans(calls, layout)
    stashes = {run_id: GradientStash(run.leaves) for run_id, run in runs.items()}
    if backward:
        for run in runs.values():
            run.adapter.requires_grad_(True)
    try:
        with torch.set_grad_enabled(backward):
            segments = [Segment(runs[run_id].adapter, a, b) for run_id, (a, b) in spans.items()]
            group = lockstep.active()
            if group is None or group.world == 1:
                route = LoraRoute(segments, base.dtype)
                lp = _target_logprobs(base, batch, route, chunk_elements, checkpoint)
            else:
                lp = _data_parallel_logprobs(
                    base, rows, segments, group, chunk_elements, checkpoint
                )
            call_results: dict[int, losses.LossResult] = {}
            for i in layout.order:
                a, b = layout.token_span[i]
                inputs = {key: value[a:b].view(1, -1) for key, value in batch.inputs.items()}
                mask = torch.ones((1, b - a), dtype=torch.bool, device=lp.device)
                call = calls[i]
                call_results[i] = losses.compute_loss(
                    call.loss_fn, lp[a:b].view(1, -1), mask, inputs, call.config
                )
            total = None
            for result in call_results.values():
                total = result.loss if total is None else total + result.loss
            assert total is not None
            run_flags = {}
            if backward:
                ticker.phase("backward", **size)
                if lp.requires_grad:
                    lp.retain_grad()
                if total.requires_grad:
                    total.backward()
                if lockstep.active() is not None:  # each rank back-propagated its rows only
                    fresh = []
                    for run in runs.values():
                        for leaf in run.leaves:
                            if leaf.grad is None:
                                leaf.grad = torch.zeros_like(leaf)
                            fresh.append(leaf.grad)
                    lockstep.sum_(fresh)
                for run_id, stash in stashes.items():
                    flag = stash.finite_flag()
                    run_flags[run_id] = (
                        flag if flag is not None else torch.ones((), dtype=torch.bool)
                    )
    except BaseException:
        for stash in stashes.values():  # nothing of a failed pass stays
            stash.rollback()
        raise
    finally:
        for run in runs.values():
            run.adapter.requires_grad_(False)
    # One device-to-host copy for everything (outputs and verdicts).
    ordered = [call_results[i] for i in layout.order]
    host = torch.cat(
        [
            lp.detach().float(),
            *(r.elementwise.detach().float().flatten() for r in ordered),
            torch.stack([r.loss.detach().float() for r in ordered]),
            torch.stack([f.to(lp.device).float() for f in run_flags.values()])
            if run_flags
            else lp.new_zeros(0),
        ]
    ).cpu()
    n = lp.shape[0]
    lp_host = host[:n].numpy()
    loss_rows = host[n : 2 * n].numpy()
    call_losses = dict(zip(layout.order, host[2 * n : 2 * n + len(ordered)].tolist(), strict=True))
    grads_ok = dict(zip(run_flags, (bool(x) for x in host[2 * n + len(ordered) :]), strict=True))
    grad_lp = None
    if lp.grad is not None and not all(grads_ok.values()):
        grad_lp = lp.grad.detach().float().cpu().numpy()
    stats = PassStats(
        runs=len(runs),
        calls=len(calls),
        tokens=batch.num_tokens,
        sequences=len(batch.lengths),
        checkpointed=checkpoint,
    )

    guilty: dict[int, NonFiniteValue] = {}
    for i in layout.order:
        a, b = layout.token_span[i]
        bad_loss = not math.isfinite(call_losses[i]) or not np.isfinite(loss_rows[a:b]).all()
        bad_grad = grad_lp is not None and not np.isfinite(grad_lp[a:b]).all()
        run_ok = grads_ok.get(calls[i].run.run_id, True)
        if bad_loss or bad_grad or not run_ok:
            error = describe(calls[i], batch, layout, i, loss_rows, lp_host, grad_lp, call_losses)
            if bad_loss or bad_grad:
                guilty[i] = error
    failed_runs = {calls[i].run.run_id for i in guilty}
    # A run whose gradient is not finite although none of its calls shows why (an overflow
    # inside the model): a lone call is guilty; several are suspects, each run again alone.
    suspects: set[int] = set()
    for run_id, ok in grads_ok.items():
        if not ok and run_id not in failed_runs:
            failed_runs.add(run_id)
            mine = [i for i in layout.order if calls[i].run.run_id == run_id]
            if len(mine) > 1:
                suspects.update(mine)
                continue
            guilty[mine[0]] = describe(
                calls[mine[0]], batch, layout, mine[0], loss_rows, lp_host, grad_lp, call_losses
            )
    if not backward:  # nothing to roll back: only the guilty calls fail
        failed_runs = set()
    for run_id, stash in stashes.items():
        if run_id in failed_runs:
            stash.rollback()
        else:
            stash.commit()

    outputs: list[ForwardBackwardOutput | EZTinkerError | _Innocent | _Suspect] = []
    for i, call in enumerate(calls):
        if i in guilty:
            outputs.append(guilty[i])
        elif i in suspects:
            outputs.append(_Suspect())
        elif call.run.run_id in failed_runs:
            outputs.append(_Innocent())
        else:
            outputs.append(
                output(
                    call,
                    batch,
                    layout,
                    i,
                    lp_host,
                    loss_rows,
                    call_losses,
                    stats,
                    call_results[i].metrics,
                )
            )
            if backward:
                call.run.tokens_trained += sum(len(r.tokens) for r in call.rows)
                call.run.last_loss = call_losses[i]
    return outputs


# --------------------------------------------------------------------------- logprobs


def _target_logprobs(
    base: LoadedBase,
    batch: PackedBatch,
    route: LoraRoute,
    chunk_elements: int,
    checkpoint: bool,
) -> torch.Tensor:
    """float32 logprob of every packed target: [N]."""
    model = base.model
    kwargs = packed_kwargs(batch.cu_seqlens, batch.max_seqlen)
    base.context.route = route
    try:
        with packed(model), activation_checkpointing(model, base.context, checkpoint):
            unembed = getattr(model, "get_output_embeddings")()  # noqa: B009
            if not _plain_unembedding(model) or not isinstance(unembed, MultiLoraLinear):
                logits = model(
                    input_ids=batch.input_ids,
                    position_ids=batch.position_ids,
                    use_cache=False,
                    **kwargs,
                ).logits[0]
                return target_logprobs(logits, batch.targets, chunk_elements)
            body = getattr(model, str(getattr(model, "base_model_prefix")))  # noqa: B009
            hidden = body(
                input_ids=batch.input_ids,
                position_ids=batch.position_ids,
                use_cache=False,
                **kwargs,
            ).last_hidden_state[0]
        segments = []
        for seg in route.segments:
            factors = seg.factors.get(unembed.path)  # (A^T, scale * B^T) in the pass's dtype
            lora = None if factors is None else (factors[0].t(), factors[1].t(), 1.0)
            segments.append(UnembedSegment(seg.start, seg.stop, lora))
        return unembed_logprobs(
            hidden, unembed.weight, unembed.bias, batch.targets, segments, chunk_elements
        )
    finally:
        base.context.route = None


def _data_parallel_logprobs(
    base: LoadedBase,
    rows: Sequence[Row],
    segments: Sequence[Segment],
    group: lockstep.Group,
    chunk_elements: int,
    checkpoint: bool,
) -> torch.Tensor:
    """The logprob of every packed target [N] (float32), each rank computing a share of the rows.

    The rows are split into ``group.world`` contiguous shares balanced by tokens; this rank runs
    the sharded model over its share only, and the shares' values are summed into the full [N]
    vector on every rank. Only this rank's share carries autograd history, so a backward of any
    loss over the full vector gives this rank's rows' gradient; the caller sums the ranks'
    gradients (``lockstep.sum_``). A rank without a row runs one token of the first row with a
    zero weight: every rank must run every forward and backward of a sharded model.
    """
    sizes = [len(r.tokens) for r in rows]
    first, last = lockstep.split(sizes, group.world)[group.rank]
    start, stop = sum(sizes[:first]), sum(sizes[:last])
    mine = list(rows[first:last])
    dummy = not mine
    if dummy:
        head = rows[0]
        mine = [Row(head.tokens[:1], head.targets[:1], {k: v[:1] for k, v in head.floats.items()})]
        start = stop = 0
    local: list[Segment] = []
    for seg in segments:  # the segments over this rank's tokens, shifted to start at 0
        a, b = max(seg.start, start), min(seg.stop, stop)
        if dummy and seg is segments[0]:
            a, b = 0, 1
        elif b <= a:
            continue
        else:
            a, b = a - start, b - start
        local.append(Segment(seg.adapter, a, b))
    route = LoraRoute(local, base.dtype)
    lp_mine = _target_logprobs(base, pack(mine, base.device), route, chunk_elements, checkpoint)
    total = sum(sizes)
    gathered = lp_mine.new_zeros(total, dtype=torch.float32)
    if not dummy:
        gathered[start:stop] = lp_mine.detach().float()
    lockstep.sum_([gathered])
    if dummy:
        return gathered + lp_mine.float().sum() * 0.0
    return torch.cat([gathered[:start], lp_mine.float(), gathered[stop:]])


def _plain_unembedding(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return not any(getattr(config, key, None) for key in _LOGIT_POSTPROCESSING)
