"""The one place Celery is configured.

``make_celery(settings)`` builds the app from the settings object; nothing is created at import
time. Choices, and why:

- JSON only (``task_serializer``, ``result_serializer``, ``accept_content``): never pickle.
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after its
  operation finished, so a crashed worker's operation is redelivered; workers skip an operation
  whose ``seq_id`` they already applied, which makes redelivery safe.
- ``worker_prefetch_multiplier=1`` with concurrency 1 (threads pool, see ``eztinker_tasks.worker``):
  each run queue has exactly one consumer that holds at most one message at a time, which is
  what keeps a run's operations in submission order.
- ``visibility_timeout`` exceeds the slowest operation, so Redis never redelivers a message
  that is still being worked on.
- No ``task_track_started``: a redelivered message must still find its first SUCCESS record
  (the worker answers a duplicate with it); ``running`` comes from our own started marker.
"""

from __future__ import annotations

from celery import Celery

from config import Settings
from eztinker_tasks.names import SAMPLE_QUEUE


def make_celery(settings: Settings, redis_url: str) -> Celery:
    """Build the Celery app for ``redis_url`` (broker and result backend)."""
    backend = f"eztinker_tasks.result_backend:ResultBackend+{redis_url}"
    app = Celery(
        "eztinker",
        broker=redis_url,
        backend=backend,
        set_as_current=False,
        # Every task reports failures as OperationFailed and logs them once, by kind.
        task_cls="eztinker_tasks.task_base:OperationTask",
    )
    app.conf.broker_transport = "eztinker_tasks.transport:Transport"
    visibility = int(settings.op_timeout_s * 2 + 300)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=False,
        result_expires=settings.result_ttl_s,
        result_extended=False,  # args would double every result; the worker is in ezt:future
        worker_disable_rate_limits=True,
        task_default_queue=SAMPLE_QUEUE,
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": visibility},
        result_backend_transport_options={"visibility_timeout": visibility},
        # Only the prefork pool enforces these; under the threads pool a CUDA op cannot be
        # interrupted anyway. Long ops are bounded by the engine's own deadlines (sampling) and
        # by futures, which fail once an op has run longer than EZTINKER_OP_TIMEOUT_S.
        task_soft_time_limit=settings.op_timeout_s,
        task_time_limit=settings.op_timeout_s + 60,
        worker_send_task_events=False,  # Flower turns events on while it watches
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        timezone="UTC",
    )
    app.conf.include = ["eztinker_tasks.tasks"]
    app.conf.eztinker_settings = settings
    return app
