"""Turning ``forward``/``forward_backward`` calls into packed passes (``passes.run_pass``).

``loss_call`` validates one call (a ``CallSpec``) against its run's base; ``run_calls`` groups
the calls of many runs into as few passes as possible (one per base and direction), each with
activation checkpointing when it would not fit otherwise; ``calls_of_one_run`` runs a run's
consecutive calls in one pass, all or nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from eztinker_tasks.engine import lockstep, losses
from eztinker_tasks.engine.batching import validate_rows
from eztinker_tasks.engine.finite import GradientStash
from eztinker_tasks.engine.memory import needs_checkpointing
from eztinker_tasks.engine.passes import LossCall, run_pass
from eztinker_tasks.engine.runs import RunState
from eztinker_tasks.errors import EZTinkerError, InvalidRequest
from eztinker_tasks.loss_specs import get_loss_spec, resolve_loss_config
from eztinker_tasks.types import CallSpec, ForwardBackwardOutput, ProgressFn


def loss_call(run: RunState, spec: CallSpec) -> LossCall:
    """Validate ``spec`` (its loss, config and datums) for ``run``; InvalidRequest if bad."""
    loss = get_loss_spec(spec.loss_fn)
    config = resolve_loss_config(loss, spec.loss_fn_config)
    if spec.loss_fn not in losses.LOSS_FNS:
        raise InvalidRequest(
            f"loss_fn {spec.loss_fn!r} is not implemented by this engine yet",
            errors={"loss_fn": [f"not implemented: {spec.loss_fn}"]},
        )
    info = run.base.info
    rows = validate_rows(spec.data, loss, info.vocab_size, info.max_context)
    op = "forward_backward" if spec.backward else "forward"
    return LossCall(run, rows, spec.loss_fn, config, op)


def checkpoint_pass(mode: str, calls: Sequence[LossCall], backward: bool) -> bool:
    """Whether a pass recomputes activations in its backward (see ``memory``)."""
    if not backward or not calls:
        return False
    tokens = sum(len(r.tokens) for call in calls for r in call.rows)
    group = lockstep.active()
    if group is not None:  # a multi-GPU worker: each rank runs about its share of the rows
        tokens = -(-tokens // group.world)
    return needs_checkpointing(mode, calls[0].run.base, tokens)


def run_calls(
    calls: Sequence[LossCall | EZTinkerError],
    backwards: Sequence[bool],
    *,
    chunk_elements: int,
    checkpointing: str,
    progress: ProgressFn | None = None,
) -> list[ForwardBackwardOutput | EZTinkerError]:
    """Each call's result or error; validated calls (``LossCall``) share passes."""
    results: list[ForwardBackwardOutput | EZTinkerError | None] = [
        c if isinstance(c, EZTinkerError) else None for c in calls
    ]
    passes: dict[tuple[int, bool], list[tuple[int, LossCall]]] = {}
    for i, (call, backward) in enumerate(zip(calls, backwards, strict=True)):
        if isinstance(call, LossCall):
            passes.setdefault((id(call.run.base), backward), []).append((i, call))
    for (_, backward), members in passes.items():
        group = [call for _, call in members]
        outcome = run_pass(
            group[0].run.base,
            group,
            backward=backward,
            chunk_elements=chunk_elements,
            checkpoint=checkpoint_pass(checkpointing, group, backward),
            progress=progress,
        )
        for (i, _), value in zip(members, outcome, strict=True):
            results[i] = value
    return [r for r in results if r is not None]


def calls_of_one_run(
    calls: Sequence[LossCall],
    *,
    backward: bool,
    chunk_elements: int,
    checkpointing: str,
    progress: ProgressFn | None = None,
) -> list[ForwardBackwardOutput]:
    """Consecutive calls of ONE run in one pass; the first error raised, nothing applied."""
    run = calls[0].run
    # All or nothing: the pass may apply some calls and refuse others; set the earlier
    # gradient and counters aside, and put back exactly them if any call fails.
    outer = GradientStash(run.leaves)
    counters = (run.tokens_trained, run.last_loss)
    try:
        outcome = run_pass(
            run.base,
            calls,
            backward=backward,
            chunk_elements=chunk_elements,
            checkpoint=checkpoint_pass(checkpointing, calls, backward),
            progress=progress,
        )
    except BaseException:
        outer.rollback()
        run.tokens_trained, run.last_loss = counters
        raise
    errors = [o for o in outcome if isinstance(o, EZTinkerError)]
    if errors:
        outer.rollback()
        run.tokens_trained, run.last_loss = counters
        raise errors[0]
    outer.commit()
    return [o for o in outcome if isinstance(o, ForwardBackwardOutput)]
