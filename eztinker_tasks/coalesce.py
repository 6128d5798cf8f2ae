"""Coalescing a run's queued training operations into one engine pass.

A researcher's loop often submits several ``forward_backward`` (or ``forward``) calls in a
row before the ``optim_step``. When the worker picks up one of them, the ones queued right
behind it in the run's queue (same operation, same loss) can run in the SAME batched pass:
gradients add up exactly as they would call by call, and every call gets its own outputs and
metrics. Their results are stored under their own futures and their seq_ids are recorded as
applied, so when Celery delivers those messages in their turn the worker answers them from the
stored result without touching the model. Only a contiguous run of compatible messages at the
head of the queue is taken, so submission order is kept.

Once their results are stored, the answered messages are removed from the queue (``LREM`` of
the exact message), which saves Celery delivering them only to be answered from the store.
This is safe: with prefetch 1 the worker holds no other message and has no pop outstanding
while an operation runs, and a message that is delivered anyway is answered by its seq_id.
(kombu pushes with ``LPUSH`` and pops the oldest message from the right.)
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis


@dataclass(frozen=True)
class QueuedOp:
    task_id: str
    seq_id: int
    data: list[dict[str, Any]]
    raw: bytes  # the message as it sits in the queue (to remove it once answered)


def _decode(raw: bytes | str) -> tuple[str, str, dict[str, Any]] | None:
    """(task name, task id, kwargs) of a kombu Redis message, or None if it is not ours."""
    try:
        message = json.loads(raw)
        if message.get("content-type") != "application/json":
            return None
        headers, properties = message["headers"], message["properties"]
        body = message["body"]
        if properties.get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _embed = json.loads(body)
    except (ValueError, KeyError, TypeError):
        return None
    if args or not isinstance(kwargs, dict):
        return None
    return str(headers.get("task")), str(headers.get("id")), kwargs


def remove_answered(pipe: redis.client.Pipeline, queue: str, ops: list[QueuedOp]) -> None:
    """Add to ``pipe``: drop the answered messages (one already gone is simply skipped)."""
    for op in ops:
        pipe.lrem(queue, -1, op.raw)  # ty: ignore[no-matching-overload] - bytes work


def peek_followers(
    oldest_last: Sequence[bytes],
    task_name: str,
    run_id: str,
    loss_fn: str,
    loss_fn_config: Mapping[str, float] | None,
    *,
    max_tokens: int,
    already_applied: Callable[[int], bool],
) -> list[QueuedOp]:
    """The operations queued right behind the current one that can share its pass.

    ``oldest_last`` is the head of the run's queue as ``LRANGE queue -n -1`` returns it.
    """
    followers: list[QueuedOp] = []
    tokens = 0
    for raw in reversed(oldest_last):  # oldest first: the order they will run in
        decoded = _decode(raw)
        if decoded is None:
            break
        name, task_id, kwargs = decoded
        if name != task_name or kwargs.get("run_id") != run_id:
            break
        if kwargs.get("loss_fn", "cross_entropy") != loss_fn:
            break
        if (kwargs.get("loss_fn_config") or {}) != dict(loss_fn_config or {}):
            break
        seq_id, data = kwargs.get("seq_id"), kwargs.get("data")
        if not isinstance(seq_id, int) or not isinstance(data, list) or not data:
            break
        try:
            size = sum(len(d["tokens"]) for d in data)
        except (KeyError, TypeError):
            break
        if tokens + size > max_tokens or already_applied(seq_id):
            break
        followers.append(QueuedOp(task_id, seq_id, data, raw))
        tokens += size
    return followers
