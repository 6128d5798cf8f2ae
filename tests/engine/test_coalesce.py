"""``forward_backward_many``: several queued operations in one pass, same answers as one by one."""

from __future__ import annotations

import pytest

from eztinker_tasks.engine import Engine
from eztinker_tasks.errors import InvalidRequest
from tests.engine.engine_helpers import (
    datum,
    grads_copy,
    logprob_atol,
    new_run,
    rel_err,
    rel_tol,
)

GROUPS = [
    [datum([5, 17, 42, 99, 7], weights=[1.0, 0.5, -1.0, 2.0, 1.0])],
    [datum([300, 12, 64]), datum([8, 250, 31, 77, 9, 10, 11])],
    [datum([1, 2, 3, 4], weights=[0.0, 1.0, 1.0, 0.0])],
]


def test_groups_match_separate_calls(engine: Engine, base_model: str) -> None:
    new_run(engine, "one", base_model, seed=3)
    new_run(engine, "many", base_model, seed=3)
    separate = [engine.forward_backward("one", g) for g in GROUPS]
    together = engine.forward_backward_many("many", GROUPS)
    assert len(together) == len(GROUPS)
    for a, b in zip(separate, together, strict=True):
        assert b.metrics.keys() == a.metrics.keys()
        for key in a.metrics:
            assert b.metrics[key] == pytest.approx(a.metrics[key], rel=1e-4, abs=1e-4)
        for out_a, out_b in zip(a.loss_fn_outputs, b.loss_fn_outputs, strict=True):
            assert out_b["logprobs"] == pytest.approx(out_a["logprobs"], abs=logprob_atol(engine))
    # The accumulated gradient is that of all the calls.
    ga, gb = grads_copy(engine, "one"), grads_copy(engine, "many")
    for key in ga:
        assert rel_err(gb[key], ga[key]) < rel_tol(engine), key
    info_a, info_b = engine.run_info("one"), engine.run_info("many")
    assert info_a.tokens_trained == info_b.tokens_trained
    assert info_b.last_loss == pytest.approx(info_a.last_loss, rel=1e-4)


def test_forward_many_changes_nothing(engine: Engine, base_model: str) -> None:
    new_run(engine, "r", base_model, seed=1)
    outs = engine.forward_backward_many("r", GROUPS, backward=False)
    assert [len(o.loss_fn_outputs) for o in outs] == [1, 2, 1]
    assert engine.run_info("r").tokens_trained == 0
    assert not engine._runs["r"].has_grad()


def test_an_empty_group_is_rejected(engine: Engine, base_model: str) -> None:
    new_run(engine, "r", base_model)
    with pytest.raises(InvalidRequest):
        engine.forward_backward_many("r", [GROUPS[0], []])
