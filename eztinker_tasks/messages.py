"""Celery task messages in the exact form kombu's Redis transport keeps them in a queue.

The web process builds the message itself (headers from Celery's own ``as_task_v2``) so that
recording a future, claiming its ``seq_id`` and queueing the message happen in ONE Redis script
(see ``Store.submit_op``): either all of it happens or none of it, and a submit costs one round
trip instead of three. A message queued this way is indistinguishable to the worker from one
that ``send_task`` would have published: a JSON envelope ``{body, content-type,
content-encoding, headers, properties}`` pushed with ``LPUSH`` onto the list named after the
queue (kombu pops the oldest from the right).

The body is kept as plain JSON text (``body_encoding`` utf-8, which kombu passes through
untouched) rather than base64, so the script can write the seq_id it picks into the body: the
kwargs start with ``"seq_id": SEQ_TOKEN``, and the script replaces the first occurrence of the
token, which is that one, since nothing precedes it in the message.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from celery import Celery

from eztinker_tasks.store import QueuedMessage

SEQ_TOKEN = "@ezt-seq@"
# How the token reads inside the envelope: a JSON string inside a JSON string.
SEQ_TOKEN_IN_MESSAGE = json.dumps(json.dumps(SEQ_TOKEN))[1:-1]


def task_message(
    app: Celery,
    task_name: str,
    task_id: str,
    kwargs: Mapping[str, Any],
    queue: str,
    *,
    with_seq: bool = False,
) -> QueuedMessage:
    """The message ``app.send_task(task_name, kwargs=kwargs, task_id=task_id, queue=queue)``
    would queue; with ``with_seq`` its kwargs begin with a seq_id the submit script fills in.
    """
    body_kwargs = {"seq_id": SEQ_TOKEN, **kwargs} if with_seq else dict(kwargs)
    shown = ", ".join(f"{k}: {kwargs[k]!r}" for k in ("run_id",) if k in kwargs)
    # Celery would otherwise repr the (possibly large) batch for every message.
    reprs = {"argsrepr": "()", "kwargsrepr": "{" + shown + "}"}
    headers, properties, body, _ = app.amqp.as_task_v2(
        task_id,
        task_name,
        args=(),
        kwargs=body_kwargs,
        **reprs,
        reply_to=app.thread_oid,
        ignore_result=None,  # as send_task sends it: the task decides
    )
    envelope = {
        "body": json.dumps(body, separators=(",", ":")),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            **properties,
            **reprs,  # send_task's extra options land in the properties too
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "utf-8",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    payload = json.dumps(envelope, separators=(",", ":"))
    return QueuedMessage(queue, payload, SEQ_TOKEN_IN_MESSAGE if with_seq else "")
