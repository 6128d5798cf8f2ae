"""Reporting an operation's progress from inside the engine, at (almost) no cost.

An engine operation that can take long (``generate``, ``run_loss``) takes an optional
``progress`` callback (``eztinker_tasks.types.ProgressFn``). ``Ticker`` calls it at each phase
change (a handful per operation) and, within a phase, at most once every ``interval_s``
seconds: the decode loop ticks every token, and a tick costs one ``time.monotonic()``. Values
that need the device (how many sequences finished) are computed only when a report is made,
never per token. On a GPU the phase is the host's: it is where the Python thread is, which may
run ahead of the device's queued kernels.

The callback is plain Python (it never sees Celery or Redis) and must return quickly; an
exception it raises is swallowed (progress must never fail the operation).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from eztinker_tasks.types import OpPhase, OpProgress, ProgressFn

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 0.5


class Ticker:
    """Throttles progress reports to ``fn`` (a no-op when ``fn`` is None)."""

    def __init__(self, fn: ProgressFn | None, interval_s: float | None = None) -> None:
        self._fn = fn
        self._interval_s = REPORT_INTERVAL_S if interval_s is None else interval_s
        self._last = time.monotonic()
        self._state: OpProgress | None = None

    def phase(
        self,
        phase: OpPhase,
        *,
        tokens_done: int | None = None,
        tokens_total: int | None = None,
        sequences: int | None = None,
    ) -> None:
        """Enter ``phase`` (always reported)."""
        if self._fn is None:
            return
        self._emit(OpProgress(phase, tokens_done, tokens_total, sequences))

    def tick(self, tokens_done: int, finished: Callable[[], int] | None = None) -> None:
        """Progress within the phase; reported if ``interval_s`` passed since the last report.

        ``finished`` (how many sequences stopped) is called only when a report is made.
        """
        if self._fn is None or self._state is None:
            return
        if time.monotonic() - self._last < self._interval_s:
            return
        done = None if finished is None else finished()
        self._emit(replace(self._state, tokens_done=tokens_done, sequences_finished=done))

    def _emit(self, state: OpProgress) -> None:
        assert self._fn is not None
        self._state = state
        self._last = time.monotonic()
        try:
            self._fn(state)
        except Exception:  # progress is best-effort: it never fails the operation
            log.debug("progress callback failed", exc_info=True)
