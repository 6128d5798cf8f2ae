"""Celery's Redis result backend, minus the per-send subscription.

On every ``send_task`` the stock backend subscribes to the task's result channel so that a
later ``AsyncResult.get()`` returns quickly. EZTinker never calls ``.get()`` in the web process
(futures are read by ``GET /v1/futures/<id>``, which subscribes only while it long-polls), so
the subscription is pure overhead on the submit path.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend


class ResultBackend(RedisBackend):
    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None
