"""Reading the heads of run queues: which queued calls may join the pass that is starting.

A researcher's loop often submits several ``forward_backward`` (or ``forward``) calls in a
row before the ``optim_step``, and many runs on one worker do so at once. When the worker picks
up one such call, the calls waiting at the HEAD of its run's queue (the same operation, any
loss) and at the heads of the queues of its other runs on the same base can run in the SAME
batched pass (``eztinker_tasks.cycle``): each gets exactly its own outputs and gradient. Only a
contiguous run of compatible messages at the head of a queue is taken, so each run's
submission order is kept.

Once their results are stored, the answered messages are removed from their queues (``LREM`` of
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

from eztinker_tasks.names import OPTIM_STEP


@dataclass(frozen=True)
class QueuedOp:
    """A call waiting in a run's queue, as its message tells it."""

    task_id: str
    seq_id: int
    data: list[dict[str, Any]]
    raw: bytes  # the message as it sits in the queue (to remove it once answered)
    run_id: str = ""
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, float] | None = None
    adam: dict[str, float] | None = None  # an optim_step's hyper-parameters

    @property
    def tokens(self) -> int:
        return sum(len(d["tokens"]) for d in self.data)


def decode_message(raw: bytes | str) -> tuple[str, str, dict[str, Any]] | None:
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


def head_calls(
    oldest_last: Sequence[bytes],
    task_name: str,
    run_id: str,
    *,
    max_ops: int,
    max_tokens: int,
    already_applied: Callable[[int], bool],
) -> list[QueuedOp]:
    """The calls of ``task_name`` at the head of run ``run_id``'s queue, oldest first.

    ``oldest_last`` is the head of the queue as ``LRANGE queue -n -1`` returns it. Stops at the
    first message that is another operation, another run's, malformed, over the budget
    (``max_ops`` calls, ``max_tokens`` tokens) or already applied (a late redelivery).
    """
    calls: list[QueuedOp] = []
    tokens = 0
    for raw in reversed(oldest_last):  # oldest first: the order they will run in
        if len(calls) >= max_ops:
            break
        decoded = decode_message(raw)
        if decoded is None:
            break
        name, task_id, kwargs = decoded
        if name != task_name or kwargs.get("run_id") != run_id:
            break
        seq_id, data = kwargs.get("seq_id"), kwargs.get("data")
        loss_fn, config = kwargs.get("loss_fn", "cross_entropy"), kwargs.get("loss_fn_config")
        if not isinstance(seq_id, int) or not isinstance(data, list) or not data:
            break
        if not isinstance(loss_fn, str) or not isinstance(config, (dict, type(None))):
            break
        try:
            size = sum(len(d["tokens"]) for d in data)
        except (KeyError, TypeError):
            break
        if tokens + size > max_tokens or already_applied(seq_id):
            break
        calls.append(QueuedOp(task_id, seq_id, data, raw, run_id, loss_fn, config))
        tokens += size
    return calls


def head_optim_step(
    oldest_last: Sequence[bytes], run_id: str, already_applied: Callable[[int], bool]
) -> QueuedOp | None:
    """The ``optim_step`` at the head of run ``run_id``'s queue, if that is what comes next."""
    if not oldest_last:
        return None
    decoded = decode_message(oldest_last[-1])
    if decoded is None:
        return None
    name, task_id, kwargs = decoded
    seq_id, adam = kwargs.get("seq_id"), kwargs.get("adam")
    if name != OPTIM_STEP or kwargs.get("run_id") != run_id:
        return None
    if not isinstance(seq_id, int) or not isinstance(adam, dict) or already_applied(seq_id):
        return None
    return QueuedOp(task_id, seq_id, [], oldest_last[-1], run_id, adam=adam)


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
    """The calls queued right behind the current one with the same loss (``head_calls``)."""
    calls = head_calls(
        oldest_last,
        task_name,
        run_id,
        max_ops=len(oldest_last),
        max_tokens=max_tokens,
        already_applied=already_applied,
    )
    same = []
    for call in calls:
        if call.loss_fn != loss_fn or (call.loss_fn_config or {}) != dict(loss_fn_config or {}):
            break
        same.append(call)
    return same
