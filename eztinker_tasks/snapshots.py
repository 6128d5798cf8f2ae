"""Automatic snapshots of recoverable runs, written off the worker's operation thread.

At an ``optim_step`` boundary (no accumulated gradient), once ``EZTINKER_SNAPSHOT_INTERVAL_S``
or ``EZTINKER_SNAPSHOT_EVERY_STEPS`` steps have passed since the run's last snapshot (so a
recovery replays at most about that much work), right after a run is created, loaded or
recovered, and when its worker stops, the worker copies the run's full state to host memory
(``Engine.capture_state``: the device-to-host copy is the only work on the operation thread)
and hands it to ``SnapshotWriter``, a background thread that:

1. writes it as a state checkpoint, atomically, to
   ``CHECKPOINTS_DIR/.snapshots/<run_id>/<seq_id>`` (the dot keeps it out of listings);
2. waits until the op it follows has its result stored (so an op is never trimmed from the
   log before it is answered), at most ``ANSWER_WAIT_S``;
3. commits it (``OpLog.commit_snapshot``: the snapshot record and the log trimmed up to its
   seq_id, in one transaction) and deletes the snapshot it replaced (pruning).

Only the newest capture of a run waits to be written: a newer one replaces an older one
still queued.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from eztinker_tasks.atomic_dirs import write_atomically
from eztinker_tasks.oplog import OpLog, SnapshotRecord
from eztinker_tasks.store import Store

if TYPE_CHECKING:
    from eztinker_tasks.engine import Backend
    from eztinker_tasks.engine.checkpoints import Captured

log = logging.getLogger(__name__)

ANSWER_WAIT_S = 30.0


def snapshot_root(checkpoints_dir: Path) -> Path:
    return Path(checkpoints_dir) / ".snapshots"


@dataclass(frozen=True)
class SnapshotJob:
    """A captured state of ``run_id`` after op ``seq_id`` (whose future is ``future_id``)."""

    run_id: str
    seq_id: int
    future_id: str
    step: int
    captured: Captured


class SnapshotWriter(threading.Thread):
    """Writes and commits captured snapshots in the background (see the module docstring)."""

    def __init__(
        self,
        oplog: OpLog,
        root: Path,
        worker: Callable[[], str],
        answered: Callable[[str], bool],
    ) -> None:
        super().__init__(name="eztinker-snapshots", daemon=True)
        self.oplog = oplog
        self.root = root
        self.worker = worker
        self.answered = answered
        self._pending: dict[str, SnapshotJob] = {}
        self._cond = threading.Condition()
        self._busy = 0
        self.committed = 0  # snapshots committed by this process (for tests and logs)

    def submit(self, job: SnapshotJob) -> None:
        with self._cond:
            self._pending[job.run_id] = job
            self._cond.notify()

    def drain(self, timeout_s: float = 60.0) -> bool:
        """Wait until every submitted snapshot is committed or dropped; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                run_id = next(iter(self._pending))
                job = self._pending.pop(run_id)
                self._busy += 1
            try:
                self.write(job)
            except Exception:
                log.exception("snapshot of run %s at op %d failed", job.run_id, job.seq_id)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def write(self, job: SnapshotJob) -> None:
        """Write ``job``, wait for its op's answer, commit it and prune the one it replaces."""
        directory = self.root / job.run_id / f"{job.seq_id:012d}"
        write_atomically(directory, job.captured.write)
        deadline = time.monotonic() + ANSWER_WAIT_S
        while not self.answered(job.future_id):
            if time.monotonic() > deadline:
                log.warning(
                    "op %d of run %s has no result: snapshot dropped", job.seq_id, job.run_id
                )
                shutil.rmtree(directory, ignore_errors=True)
                return
            time.sleep(0.02)
        record = SnapshotRecord(job.seq_id, str(directory), job.step, time.time(), self.worker())
        try:
            replaced = self.oplog.commit_snapshot(job.run_id, record)
        except redis.RedisError:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        if replaced is record:  # a newer snapshot was committed meanwhile
            shutil.rmtree(directory, ignore_errors=True)
            return
        self.committed += 1
        if replaced is not None and Path(replaced.path) != directory:
            shutil.rmtree(replaced.path, ignore_errors=True)


class Snapshots:
    """When a worker snapshots its recoverable runs (the policy over a ``SnapshotWriter``)."""

    def __init__(
        self,
        engine: Backend,
        store: Store,
        writer: SnapshotWriter,
        interval_s: float,
        enabled: bool = True,
        every_steps: int = 0,
    ) -> None:
        self.engine = engine
        self.store = store
        self.writer = writer
        self.interval_s = interval_s
        self.every_steps = every_steps
        self.enabled = enabled
        self._last: dict[str, float] = {}  # run -> monotonic time of its last capture
        self._seq: dict[str, int] = {}  # run -> the seq_id of its last capture
        self._step: dict[str, int] = {}  # run -> its step at its last capture
        self._recoverable: dict[str, bool] = {}

    def after_op(self, run_id: str, seq_id: int, future_id: str, *, force: bool = False) -> bool:
        """Snapshot ``run_id`` (state after op ``seq_id``) if it is due; whether it was."""
        if not self.enabled or not self.engine.has_run(run_id) or not self._is_recoverable(run_id):
            return False
        now = time.monotonic()
        info = self.engine.run_info(run_id)
        due = now - self._last.get(run_id, -1e18) >= self.interval_s or (
            self.every_steps > 0 and info.step - self._step.get(run_id, 0) >= self.every_steps
        )
        if not (force or due):
            return False
        if info.extra.get("has_accumulated_grad"):
            return False  # not at an optim_step boundary: gradients would be lost
        captured = self.engine.capture_state(run_id)
        self._last[run_id] = now
        self._seq[run_id] = seq_id
        step = self._step[run_id] = int(captured.meta["step"])
        if not self.writer.is_alive():
            self.writer.start()
        self.writer.submit(SnapshotJob(run_id, seq_id, future_id, step, captured))
        return True

    def _is_recoverable(self, run_id: str) -> bool:
        known = self._recoverable.get(run_id)
        if known is None:
            record = self.store.get_run(run_id)
            known = bool(record and record.recoverable)
            self._recoverable[run_id] = known
        return known

    def flush(self, applied: dict[str, int], timeout_s: float = 60.0) -> int:
        """Snapshot every held run with ops applied since its last snapshot, and wait until
        they are written (a worker that stops, so that its restart replays nothing).

        ``applied``: run -> the highest seq_id applied. Returns how many were taken.
        """
        taken = 0
        for run_id in self.engine.list_runs():
            seq_id = applied.get(run_id)
            if seq_id is None or seq_id <= self._seq.get(run_id, -1):
                continue
            future_id = self.store.applied_future(run_id, seq_id)
            if future_id is not None and self.after_op(run_id, seq_id, future_id, force=True):
                taken += 1
        if taken:
            self.writer.drain(timeout_s)
        return taken

    def forget(self, run_id: str) -> None:
        self._last.pop(run_id, None)
        self._seq.pop(run_id, None)
        self._step.pop(run_id, None)
        self._recoverable.pop(run_id, None)


def remove_snapshots(checkpoints_dir: Path, run_id: str) -> None:
    """Delete every snapshot of ``run_id`` (its run was deleted)."""
    shutil.rmtree(snapshot_root(checkpoints_dir) / run_id, ignore_errors=True)
