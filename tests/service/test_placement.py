"""Placement knows base sizes: a ``shaped:`` base, a local directory or a cached hub model goes
to a worker whose GPUs hold it."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest

from eztinker_tasks import model_sizes, shapes
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


def _checkpoint(directory: Path, total: int | None, files: int = 0, dtype: str = "bfloat16"):
    """A model directory's metadata as a real checkpoint has it (no real weights needed)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": dtype}))
    if total is not None:
        index = {"metadata": {"total_size": total}, "weight_map": {}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    for i in range(files):
        (directory / f"model-{i}.safetensors").write_bytes(b"\0" * 1000)
    return directory


def test_local_and_cached_hub_bases_are_sized_from_their_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = _checkpoint(tmp_path / "llama-70b", 141 * 10**9)
    small = _checkpoint(tmp_path / "small", None, files=3)
    fp32 = _checkpoint(tmp_path / "fp32", 60 * 10**9, dtype="float32")
    assert model_sizes.weight_bytes(str(big)) == 141 * 10**9
    assert model_sizes.weight_bytes(str(small)) == 3000
    assert model_sizes.weight_bytes(str(fp32)) == 30 * 10**9  # held in bf16
    assert model_sizes.weight_bytes("tiny-llama") is None
    assert model_sizes.weight_bytes(str(tmp_path / "missing")) is None
    # a hub model in the local Hugging Face cache
    cache = tmp_path / "hub"
    repo = cache / "models--acme--big-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    _checkpoint(repo / "snapshots" / "abc123", 141 * 10**9)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert model_sizes.weight_bytes("acme/big-model") == 141 * 10**9
    assert model_sizes.weight_bytes("acme/not-cached") is None

    single, multi = _worker("gpu0", 1), _worker("gpus0-1", 2, runs=3)
    for name in (str(big), "acme/big-model"):
        assert pick_worker([single, multi], GIB, name).name == "gpus0-1"
        with pytest.raises(ServiceUnavailable, match="eztinker worker --gpus 0,1"):
            pick_worker([single, _worker("gpu1", 1)], GIB, name)
    assert pick_worker([_worker("gpu0", 1, runs=3), multi], GIB, str(small)).name == "gpu0"
