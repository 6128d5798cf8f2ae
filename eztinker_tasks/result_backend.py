"""Celery's Redis result backend, minus two round trips per operation.

- On every ``send_task`` the stock backend subscribes to the task's result channel so that a
  later ``AsyncResult.get()`` returns quickly. EZTinker never calls ``.get()`` in the web
  process (futures are read by ``GET /v1/futures/<id>``, whose long-polls share one pattern
  subscription per process), so that subscription is pure overhead on the submit path.
- Before storing a result the stock backend reads the current one, so that a lost, redelivered
  task cannot overwrite a SUCCESS. EZTinker's workers answer a redelivered operation from its
  stored result by seq_id (see ``tasks._run_op``), so a second store writes the same SUCCESS;
  the read is skipped.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str


class ResultBackend(RedisBackend):
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
        try:
            self._set_with_state(key, value, state)
        except BackendStoreError as exc:
            raise BackendStoreError(str(exc), state=state, task_id=task_id) from exc
        return result
