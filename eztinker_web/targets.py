"""Where a run's operations go, cached per web process so a submit needs no extra read."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class RunTarget:
    """A run, its tenant and the model that checks its tokens (fixed once known).

    Not its worker: a run can move to another worker (``load`` of a run whose worker is gone),
    so the submit script reads the worker from the run record in the same round trip.
    """

    run_id: str
    base_model: str  # "" while a run made from a checkpoint is still being created
    tenant: str  # the run's owner (fixed at creation)


class TargetCache:
    """A bounded, thread-safe map of run id -> RunTarget (the oldest entry is dropped first)."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[str, RunTarget] = OrderedDict()

    def get(self, run_id: str) -> RunTarget | None:
        with self._lock:
            return self._items.get(run_id)

    def put(self, run_id: str, target: RunTarget) -> None:
        with self._lock:
            self._items[run_id] = target
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def drop(self, run_id: str) -> None:
        with self._lock:
            self._items.pop(run_id, None)
