"""Celery's Redis result backend, minus two round trips per operation.

- On every ``send_task`` the stock backend subscribes to the task's result channel so that a
  later ``AsyncResult.get()`` returns quickly. EZTinker never calls ``.get()`` in the web
  process (futures are read by ``GET /v1/futures/<id>``, whose long-polls share one pattern
  subscription per process), so that subscription is pure overhead on the submit path.
- Before storing a result the stock backend reads the current one, so that a lost, redelivered
  task cannot overwrite a SUCCESS. EZTinker's workers answer a redelivered operation from its
  stored result by seq_id (see ``applying._run_op``), so a second store writes the same SUCCESS;
  the read is skipped.

And one addition: a task may attach writes of its own to its result (``write_with_result``),
which go in the same MULTI/EXEC as the result and its publication. A run operation records
its seq_id as applied and the run's new counters that way: atomically with the result, and
without a round trip of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

Writes = Callable[[Any], None]  # adds commands to a redis-py pipeline


class ResultBackend(RedisBackend):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._with_result: dict[str, list[Writes]] = {}
        self._answered: set[str] = set()

    def write_with_result(self, task_id: str, writes: Writes) -> None:
        """Have ``writes`` go with the task's successful result (dropped with any other)."""
        with self._lock:
            self._with_result.setdefault(task_id, []).append(writes)

    def answered_early(self, task_id: str) -> None:
        """The task's answer is stored already (a sample answered when it ended, before its
        batch): Celery's store at the task's end keeps that record, writing only what rides
        with it (``write_with_result``)."""
        with self._lock:
            self._answered.add(task_id)

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None

    def result_record(
        self,
        task_id: str,
        result: Any,
        state: str = "SUCCESS",
        traceback: Any = None,
        request: Any = None,
    ) -> tuple[str, str]:
        """The Redis key and encoded record of a task's result, as this backend stores it.

        Coalesced operations have their results written in one pipeline by the worker, in
        exactly this form (see ``tasks._loss_op``).
        """
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)
        return bytes_to_str(self.get_key_for_task(task_id)), self.encode(meta)

    def failure_record(self, task_id: str, exc: BaseException) -> tuple[str, str]:
        """The key and encoded record of a task that failed with ``exc`` (as Celery stores it)."""
        return self.result_record(task_id, self.encode_result(exc, "FAILURE"), state="FAILURE")

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        key, value = self.result_record(task_id, result, state, traceback, request)
        with self._lock:
            writes = self._with_result.pop(task_id, None)
            early = task_id in self._answered
            self._answered.discard(task_id)
        if early:
            if writes is not None and state == "SUCCESS":
                with self.client.pipeline(transaction=True) as pipe:
                    for write in writes:
                        write(pipe)
                    pipe.execute()
            return result
        try:
            if writes is not None and state == "SUCCESS":
                self.ensure(self._set_with, (key, value, writes), **self.retry_policy)
            else:
                self._set_with_state(key, value, state)
        except BackendStoreError as exc:
            raise BackendStoreError(str(exc), state=state, task_id=task_id) from exc
        return result

    def _set_with(self, key: str, value: str, writes: list[Writes]) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            for write in writes:
                write(pipe)
            if self.expires:
                pipe.setex(key, self.expires, value)
            else:
                pipe.set(key, value)
            pipe.publish(key, value)
            pipe.execute()
