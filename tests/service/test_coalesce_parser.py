"""The queue-head parser behind coalescing: which queued messages may share a pass."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from eztinker_tasks.coalesce import peek_followers

FB = "eztinker.forward_backward"


def message(task: str, task_id: str, **kwargs: Any) -> bytes:
    body = json.dumps([[], kwargs, {"callbacks": None}]).encode()
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"task": task, "id": task_id},
            "properties": {"body_encoding": "base64"},
        }
    ).encode()


def fb(task_id: str, seq: int, run: str = "r", tokens: int = 4, **kw: Any) -> bytes:
    data = [{"tokens": list(range(tokens)), "loss_fn_inputs": {"target_tokens": [1] * tokens}}]
    return message(FB, task_id, run_id=run, seq_id=seq, data=data, **kw)


def peek(
    queue_newest_first: list[bytes],
    max_tokens: int = 1000,
    already_applied: Callable[[int], bool] = lambda seq: False,
) -> list[str]:
    ops = peek_followers(
        queue_newest_first,
        FB,
        "r",
        "cross_entropy",
        None,
        max_tokens=max_tokens,
        already_applied=already_applied,
    )
    return [op.task_id for op in ops]


def test_takes_the_compatible_head_in_order() -> None:
    # LRANGE returns the newest first; the oldest (next to run) is last.
    assert peek([fb("c", 4), fb("b", 3), fb("a", 2)]) == ["a", "b", "c"]


def test_stops_at_the_first_other_operation() -> None:
    step = message("eztinker.optim_step", "s", run_id="r", seq_id=3)
    assert peek([fb("c", 4), step, fb("a", 2)]) == ["a"]


def test_stops_at_another_loss_or_config_or_run() -> None:
    assert peek([fb("b", 3, loss_fn="ppo"), fb("a", 2)]) == ["a"]
    assert peek([fb("b", 3, loss_fn_config={"beta": 1.0}), fb("a", 2)]) == ["a"]
    assert peek([fb("b", 3, run="other"), fb("a", 2)]) == ["a"]


def test_respects_the_token_budget_and_applied_seq_ids() -> None:
    assert peek([fb("b", 3, tokens=8), fb("a", 2, tokens=8)], max_tokens=10) == ["a"]
    assert peek([fb("b", 3), fb("a", 2)], already_applied=lambda s: s == 2) == []


def test_garbage_stops_the_scan() -> None:
    assert peek([fb("b", 3), b"not json", fb("a", 2)]) == ["a"]
    assert peek([b'{"content-type": "application/x-python-serialize"}']) == []
