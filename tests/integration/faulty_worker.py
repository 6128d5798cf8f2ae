"""A real EZTinker worker process with two extra tasks that fail on purpose.

``python -m tests.integration.faulty_worker NAME`` runs the worker exactly as ``eztinker worker
--name NAME --device cpu`` does (same entry point, same tasks, same logging), plus:

- ``test.crash``: a fault of ours (ZeroDivisionError, a few frames deep): its traceback must
  be logged once, for real;
- ``test.lost``: an anticipated server-side condition (``RunStateLost``): one WARNING line.
"""

from __future__ import annotations

import sys

from celery import shared_task

from eztinker_tasks.applying import _call  # the path every operation takes
from eztinker_tasks.errors import RunStateLost


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator


@shared_task(name="test.crash", bind=True)
def crash(self, n: int = 1) -> dict:
    return _call(self, lambda rt, begun: {"ratio": _ratio(n, 0)})


def _lose(rt: object, begun: object) -> dict:
    raise RunStateLost("run run_test lost its in-memory state (this is a test)")


@shared_task(name="test.lost", bind=True)
def lost(self) -> dict:
    return _call(self, _lose)


if __name__ == "__main__":
    from eztinker.processes import run_worker

    run_worker(sys.argv[1], "cpu", "INFO")
