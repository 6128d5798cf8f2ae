"""Per-tenant limits: 429 with ``Retry-After`` when a tenant holds too much.

- ``EZTINKER_TENANT_MAX_RUNS``: runs that are not deleted (failed ones count until deleted).
  Checked when a run is created; the answer is ``too_many_runs`` (category ``user``: delete a
  run first, waiting alone does not help).
- ``EZTINKER_TENANT_MAX_QUEUED_OPS``: unfinished operations (queued or running: training ops,
  samples, logprobs). Run creation and deletion are not counted, so a tenant can always free
  what it holds. The answer is ``too_many_queued_ops`` (category ``server``: the same request
  succeeds once some ops finish; the SDK retries it after ``Retry-After``).

0 means unlimited. Admin keys are not limited. The count and the admission are one Redis
script (no two requests can both take the last place); the count is only ever too high (a
finished op stays in it until the tenant reaches the limit), and at the limit the finished
entries are dropped (``eztinker_tasks.tenant_store``) before the request is tried once more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from eztinker_tasks.errors import TooManyQueuedOps, TooManyRuns
from eztinker_tasks.store import LimitReached
from eztinker_tasks.tenant_store import counted_ops, drop_ops, prune_runs
from eztinker_web.auth import caller
from eztinker_web.futures.status import finished
from eztinker_web.services import services

T = TypeVar("T")

RUNS_RETRY_AFTER_S = 30  # runs end when their owner deletes them: no point asking sooner
OPS_RETRY_AFTER_S = 1  # ops finish in seconds


def run_limit() -> int:
    """The caller's run limit (0: none)."""
    return services().settings.tenant_max_runs if caller().limited else 0


def op_limit() -> int:
    """The caller's limit on unfinished ops (0: none, and its ops are not counted)."""
    return services().settings.tenant_max_queued_ops if caller().limited else 0


def within_run_limit(attempt: Callable[[int], T]) -> T:
    """``attempt(run limit)``; at the limit, drop deleted runs from the count and try again
    once; still at it: TooManyRuns (429)."""
    limit = run_limit()
    try:
        return attempt(limit)
    except LimitReached:
        prune_runs(services().store, caller().tenant)
    try:
        return attempt(limit)
    except LimitReached as exc:
        raise TooManyRuns(
            f"tenant {caller().tenant!r} holds {exc.count} runs, its limit "
            f"(EZTINKER_TENANT_MAX_RUNS={limit}); delete a run to create another",
            retry_after_s=RUNS_RETRY_AFTER_S,
            errors={"runs": [f"at most {limit}"]},
        ) from None


def within_op_limit(attempt: Callable[[int], T]) -> T:
    """``attempt(op limit)``; at the limit, drop finished ops from the count and try again
    once; still at it: TooManyQueuedOps (429)."""
    limit = op_limit()
    try:
        return attempt(limit)
    except LimitReached:
        svc = services()
        tenant = caller().tenant
        drop_ops(svc.store, tenant, finished(svc, counted_ops(svc.store, tenant)))
    try:
        return attempt(limit)
    except LimitReached as exc:
        raise TooManyQueuedOps(
            f"tenant {caller().tenant!r} has {exc.count} unfinished operations, its limit "
            f"(EZTINKER_TENANT_MAX_QUEUED_OPS={limit}); retry after {OPS_RETRY_AFTER_S} s, "
            "once some have finished",
            retry_after_s=OPS_RETRY_AFTER_S,
            errors={"operations": [f"at most {limit} unfinished"]},
        ) from None
