"""What to say about the workers when none is live: starting, or absent."""

from __future__ import annotations

import time
from typing import Any

from eztinker_tasks.store import StartingWorker, Store, WorkerRecord


def starting_workers(store: Store, live: list[WorkerRecord]) -> list[StartingWorker]:
    """Workers launched but not yet live (a live one is never reported as starting)."""
    names = {w.name for w in live}
    return [w for w in store.starting_workers() if w.name not in names]


def describe_starting(workers: list[StartingWorker]) -> list[dict[str, Any]]:
    now = time.time()
    return [
        {"name": w.name, "pid": w.pid, "device": w.device, "for_s": round(now - w.since, 1)}
        for w in workers
    ]


def no_worker_message(starting: list[StartingWorker]) -> str:
    """Why no operation can run now, and what to do about it."""
    if not starting:
        return "no live worker: start one with `eztinker worker` (or `eztinker server`)"
    now = time.time()
    names = ", ".join(f"{w.name} (for {now - w.since:.0f} s)" for w in starting)
    verb = "is" if len(starting) == 1 else "are"
    return f"no worker is ready yet: {names} {verb} starting; retry in a few seconds"


def no_live_worker(store: Store) -> str:
    """``no_worker_message`` for the workers ``store`` records as starting."""
    return no_worker_message(starting_workers(store, []))
