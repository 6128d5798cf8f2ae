"""A base sharded over 2 ranks (FSDP2, gloo on CPU; NCCL with EZTINKER_TEST_DEVICE=cuda and
two GPUs) gives what the plain one-device engine gives: forward_backward (logprobs, loss,
gradients, also with fewer datums than ranks), optim_step, forward, sample, save and load.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from engine_helpers import DEVICE, DTYPE
from sharded_scenario import config, rank_main, scenario

from eztinker_tasks.engine import Engine, lockstep

# fp32 on the CPU must match to 1e-5; CUDA kernels pick other reduction orders per batch shape
TOL = 1e-5 if DEVICE == "cpu" else (1e-4 if DTYPE == "float32" else 5e-2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _flat(value: object) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in _flat(item)]
    return [float(value)]  # ty: ignore[invalid-argument-type]


def _close(a: object, b: object, what: str) -> None:
    x, y = np.asarray(_flat(a)), np.asarray(_flat(b))
    assert x.shape == y.shape, what
    assert np.abs(x - y).max(initial=0.0) <= TOL * max(1.0, np.abs(y).max(initial=0.0)), what


# "1": each layer's weights gathered for its forward and again for its backward (large bases),
# here with activation checkpointing (the backward recomputes each layer's forward);
# "0": kept gathered from the forward through the backward (small bases on a GPU)
@pytest.fixture(scope="module", params=["1", "0"], ids=["reshard-checkpointed", "keep-gathered"])
def results(
    request: pytest.FixtureRequest, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict, dict]]:
    if DEVICE.startswith("cuda") and torch.cuda.device_count() < 2:
        pytest.fail("the sharded CUDA test needs two GPUs")
    device = "cuda" if DEVICE.startswith("cuda") else "cpu"
    tmp = tmp_path_factory.mktemp("sharded")
    out = tmp / "sharded.json"
    init = f"tcp://127.0.0.1:{free_port()}"
    checkpointing = "always" if request.param == "1" else "never"
    args = (
        2, init, str(data_dir), str(tmp / "ckpt-sharded"), device, DTYPE, str(out), checkpointing
    )  # fmt: skip
    before = os.environ.get("EZTINKER_RESHARD_AFTER_FORWARD")
    os.environ["EZTINKER_RESHARD_AFTER_FORWARD"] = request.param  # the ranks inherit it
    try:
        mp.start_processes(rank_main, args=args, nprocs=2, start_method="spawn", join=True)
    finally:
        if before is None:
            del os.environ["EZTINKER_RESHARD_AFTER_FORWARD"]
        else:
            os.environ["EZTINKER_RESHARD_AFTER_FORWARD"] = before
    sharded = json.loads(out.read_text())
    plain = scenario(Engine(config(data_dir, tmp / "ckpt-plain", DEVICE, DTYPE)))
    yield sharded, json.loads(json.dumps(plain))


def test_sharded_training_equals_one_device(results: tuple[dict, dict]) -> None:
    sharded, plain = results
    assert sharded["layer_share"] == pytest.approx(0.5, abs=0.01)  # each rank holds half
    for key in ("fb_logprobs", "fb_loss", "grads", "grads2", "grad_norm", "weights"):
        _close(sharded[key], plain[key], key)
    assert np.abs(np.asarray(plain["grads2"])).max() > 0  # the gradient is not trivially 0
    for a, b in zip(sharded["fwd_logprobs"], plain["fwd_logprobs"], strict=True):
        _close(a, b, "forward")
    for a, b in zip(sharded["cycle_logprobs"], plain["cycle_logprobs"], strict=True):
        for x, y in zip(a, b, strict=True):
            _close(x, y, "run_calls")
    _close(sharded["cycle_grads_r2"], plain["cycle_grads_r2"], "run_calls gradient")


def test_sharded_sampling_equals_one_device(results: tuple[dict, dict]) -> None:
    sharded, plain = results
    assert sharded["sample_tokens"] == plain["sample_tokens"]
    for a, b in zip(sharded["sample_logprobs"], plain["sample_logprobs"], strict=True):
        _close(a, b, "sample logprobs")
    _close(sharded["prompt_logprobs"][1:], plain["prompt_logprobs"][1:], "prompt logprobs")
    assert sharded["checkpoint_sample"] == plain["checkpoint_sample"]


def test_sharded_save_and_load_equal_one_device(results: tuple[dict, dict]) -> None:
    sharded, plain = results
    _close(sharded["loaded_weights"], sharded["weights"], "loaded = saved")
    _close(sharded["loaded_weights"], plain["loaded_weights"], "loaded weights")
    for a, b in zip(sharded["loaded_logprobs"], plain["loaded_logprobs"], strict=True):
        _close(a, b, "loaded forward")


def test_split_balances_tokens_and_keeps_order() -> None:
    assert lockstep.split([7, 3, 11, 5, 2], 2) == [(0, 2), (2, 5)]
    assert lockstep.split([4], 2) == [(0, 1), (1, 1)]
    assert lockstep.split([1, 1, 1, 1], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    shares = lockstep.split(list(range(1, 30)), 3)
    assert shares[0][0] == 0 and shares[-1][1] == 29
    assert all(a[1] == b[0] for a, b in itertools.pairwise(shares))
