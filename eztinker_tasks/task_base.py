"""The base class of every EZTinker task: how a failed operation is reported and logged.

Whatever an operation raises leaves the task as ``OperationFailed`` carrying the JSON error
envelope, so its future reports ``code``, ``message`` and a truthful ``category``. The worker's
log gets what each kind of failure deserves, once:

- a user error (an ``EZTinkerError`` of category ``user``: unknown model, bad input, ...): one
  INFO line naming the task, the future and the error, no traceback;
- an anticipated server-side condition (an ``EZTinkerError`` of category ``server``: a run whose
  state was lost, ...): one WARNING line; with the traceback of its cause if it has one;
- anything else is a fault of ours: ERROR with its real traceback (the future says
  ``internal``).

``OperationFailed`` is the task's expected exception (Celery's ``Task.throws``), so Celery
itself no longer logs every failure as "raised unexpected" with a traceback of the re-raise.
Celery is told to use this class for every task: ``make_celery`` passes it as ``task_cls``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import TaskPredicate

from eztinker_tasks.errors import EZTinkerError, InternalError, OperationFailed

log = logging.getLogger("eztinker_tasks.tasks")


class OperationTask(Task):
    """A task whose failures become ``OperationFailed`` (see the module docstring)."""

    throws = (OperationFailed,)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except (OperationFailed, TaskPredicate):  # already an envelope; Celery's retry & co
            raise
        except EZTinkerError as exc:
            where = f"{self.name}[{self.request.id}]"
            what = f"{exc.category} error {exc.code}: {exc.message}"
            if exc.category == "user":
                log.info("%s failed: %s", where, what)
            else:
                log.warning("%s failed: %s", where, what, exc_info=exc.__cause__ is not None)
            raise OperationFailed.wrap(exc) from None
        except Exception as exc:
            log.exception("%s crashed", f"{self.name}[{self.request.id}]")
            raise OperationFailed.wrap(InternalError(f"{type(exc).__name__}: {exc}")) from None
