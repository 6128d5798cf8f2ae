"""Placement knows base sizes: a ``shaped:`` base goes to a worker whose GPUs hold it."""

from __future__ import annotations

import pytest

from eztinker_tasks import shapes
from eztinker_tasks.errors import ServiceUnavailable
from eztinker_tasks.store import WorkerRecord
from eztinker_web.dispatch import pick_worker

GIB = 1 << 30
H200 = 140 * GIB


def _worker(name: str, ranks: int, runs: int = 0, device: str = "cuda:0") -> WorkerRecord:
    memory = {"free_bytes": 100 * GIB, "device_total_bytes": H200, "ranks": ranks}
    return WorkerRecord(name, "host", 1, device, tuple(f"r{i}" for i in range(runs)), memory)


def test_shaped_sizes_are_the_models_bf16_weights() -> None:
    assert shapes.param_bytes("shaped:llama-3.1-8b") == pytest.approx(16.06e9, rel=1e-3)
    assert shapes.param_bytes("shaped:llama-3.1-70b") == pytest.approx(141.1e9, rel=1e-3)
    assert shapes.param_bytes("tiny-llama") is None
    assert shapes.param_bytes("shaped:nope") is None


def test_a_base_too_large_for_one_gpu_goes_to_the_multi_gpu_worker() -> None:
    single, multi = _worker("gpu0", 1), _worker("gpus0-1", 2, runs=3)
    chosen = pick_worker([single, multi], GIB, "shaped:llama-3.1-70b")
    assert chosen.name == "gpus0-1"


def test_a_base_one_gpu_holds_goes_to_a_one_gpu_worker_first() -> None:
    single, multi = _worker("gpu0", 1, runs=3), _worker("gpus0-1", 2)
    assert pick_worker([single, multi], GIB, "shaped:llama-3.1-8b").name == "gpu0"
    # sizes unknown (a built-in or hub base): the worker with the fewest runs, as before
    assert pick_worker([single, multi], GIB, "tiny-llama").name == "gpus0-1"


def test_no_worker_holds_it_says_what_to_start() -> None:
    with pytest.raises(ServiceUnavailable) as raised:
        pick_worker([_worker("gpu0", 1), _worker("gpu1", 1)], GIB, "shaped:llama-3.1-70b")
    message = raised.value.message
    assert "needs 131 GiB" in message
    assert "eztinker worker --gpus 0,1" in message and "--gpus-per-worker 2" in message
