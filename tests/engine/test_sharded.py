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
from sharded_scenario import config, rank_main, scenario, tied_scenario

from eztinker_tasks import catalog
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


def run_ranks(
    data_dir: Path,
    tmp: Path,
    reshard: str = "1",
    checkpointing: str = "never",
    tied: tuple[str, str] | None = None,
) -> dict:
    """Rank 0's JSON after 2 spawned ranks ran their scenario (``sharded_scenario``)."""
    if DEVICE.startswith("cuda") and torch.cuda.device_count() < 2:
        pytest.fail("the sharded CUDA test needs two GPUs")
    device = "cuda" if DEVICE.startswith("cuda") else "cpu"
    out = tmp / "sharded.json"
    init = f"tcp://127.0.0.1:{free_port()}"
    args = (
        2, init, str(data_dir), str(tmp / "ckpt-sharded"), device, DTYPE, str(out), checkpointing,
        tied,
    )  # fmt: skip
    before = os.environ.get("EZTINKER_RESHARD_AFTER_FORWARD")
    os.environ["EZTINKER_RESHARD_AFTER_FORWARD"] = reshard  # the ranks inherit it
    try:
        mp.start_processes(rank_main, args=args, nprocs=2, start_method="spawn", join=True)
    finally:
        if before is None:
            del os.environ["EZTINKER_RESHARD_AFTER_FORWARD"]
        else:
            os.environ["EZTINKER_RESHARD_AFTER_FORWARD"] = before
    return json.loads(out.read_text())


def _assert_read_by_shard(sharded: dict, checkpoint: Path) -> None:
    """Rank 0 took the sharded load path: it read half of the decoder layers' rows and no
    decoder-layer parameter whole; only the embedding, final norm and lm_head whole."""
    report = sharded["load_report"]
    assert report is not None, "the base was loaded whole, not through sharded_load"
    assert report["sharded_bytes_total"] > 0
    assert report["sharded_bytes_read"] == pytest.approx(
        report["sharded_bytes_total"] / 2, rel=0.02
    )
    assert not [n for n in report["whole"] if ".layers." in n], report["whole"]
    assert any("embed" in n or "wte" in n for n in report["whole"])
    total = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    assert report["bytes_read"] < total


# "1": each layer's weights gathered for its forward and again for its backward (large bases),
# here with activation checkpointing (the backward recomputes each layer's forward);
# "0": kept gathered from the forward through the backward (small bases on a GPU)
@pytest.fixture(scope="module", params=["1", "0"], ids=["reshard-checkpointed", "keep-gathered"])
def results(
    request: pytest.FixtureRequest, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict, dict]]:
    tmp = tmp_path_factory.mktemp("sharded")
    checkpointing = "always" if request.param == "1" else "never"
    sharded = run_ranks(data_dir, tmp, request.param, checkpointing)
    plain = scenario(Engine(config(data_dir, tmp / "ckpt-plain", DEVICE, DTYPE)))
    yield sharded, json.loads(json.dumps(plain))


def test_sharded_training_equals_one_device(results: tuple[dict, dict]) -> None:
    sharded, plain = results
    assert sharded["layer_share"] == pytest.approx(0.5, abs=0.01)  # each rank holds half
    _assert_read_by_shard(sharded, Path(sharded["source"]))
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


@pytest.fixture(scope="module")
def tied_dirs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tied-embedding Llama saved in 1 MB safetensors shards with an index (its lm_head is
    not in the files), with uneven shards, and a directory with only a ``pytorch_model.bin``."""
    import shutil

    from transformers import AutoModelForCausalLM

    from eztinker_tasks.engine.tiny import tiny_config

    root = tmp_path_factory.mktemp("tied")
    model_config = tiny_config(catalog.BUILTIN_MODELS["tiny-llama"])
    model_config.tie_word_embeddings = True
    model_config.intermediate_size = 509  # odd: gate/up_proj split 255 + 254 rows (padded)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    tied, pickled = root / "tied-llama", root / "pickled-llama"
    model.save_pretrained(tied, max_shard_size="1MB")
    tokenizer = catalog.ensure_tokenizer("tiny-llama", data_dir)
    for name in catalog.TOKENIZER_FILES:
        shutil.copyfile(tokenizer / name, tied / name)
    pickled.mkdir()
    shutil.copyfile(tied / "config.json", pickled / "config.json")
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    assert len(list(tied.glob("model-*.safetensors"))) >= 3
    assert (tied / "model.safetensors.index.json").is_file()
    return tied, pickled


def test_sharded_load_of_an_indexed_tied_checkpoint_equals_one_device(
    data_dir: Path, tmp_path: Path, tied_dirs: tuple[Path, Path]
) -> None:
    tied, pickled = tied_dirs
    index = json.loads((tied / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied: saved once, as the embedding
    sharded = run_ranks(data_dir, tmp_path, tied=(str(tied), str(pickled)))
    engine = Engine(config(data_dir, tmp_path / "ckpt-plain", DEVICE, DTYPE))
    plain = json.loads(json.dumps(tied_scenario(engine, str(tied), str(pickled))))
    assert sharded["tied"] is True
    assert sharded["layer_share"] == pytest.approx(0.5, abs=0.01)
    _assert_read_by_shard(sharded, tied)
    assert sharded["load_report"]["files"] >= 3
    for key in ("fb_logprobs", "grads", "fwd_logprobs"):
        _close(sharded[key], plain[key], key)
    assert sharded["sample_tokens"] == plain["sample_tokens"]
    # the one-device engine reads the pickle with transformers; the multi-GPU worker refuses it
    assert plain["pickled_error"] is None
    message = sharded["pickled_error"]
    assert message is not None and "pytorch_model.bin" in message and "safetensors" in message


def test_checkpoint_keys_add_or_strip_the_base_model_prefix(tmp_path: Path) -> None:
    """A checkpoint of the bare ``LlamaModel`` (no ``model.`` prefix) maps onto the causal LM;
    a directory of .bin pickles, or of nothing, is refused before anything is read."""
    from transformers import AutoModelForCausalLM

    from eztinker_tasks.engine import sharded_load
    from eztinker_tasks.engine.tiny import tiny_config
    from eztinker_tasks.errors import UnknownModel

    model_config = tiny_config(catalog.BUILTIN_MODELS["tiny-llama"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    files = {k.removeprefix("model."): tmp_path for k in model.state_dict()}
    keys = sharded_load._checkpoint_keys(model, files)
    assert keys["model.layers.0.self_attn.q_proj.weight"] == "layers.0.self_attn.q_proj.weight"
    assert keys["lm_head.weight"] == "lm_head.weight"
    del files["layers.1.mlp.up_proj.weight"]
    with pytest.raises(UnknownModel, match="lacks 1 of the model's parameters"):
        sharded_load._checkpoint_keys(model, files)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UnknownModel, match="only PyTorch pickle weights"):
        sharded_load.checkpoint_files(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(UnknownModel, match="has no weights"):
        sharded_load.checkpoint_files(tmp_path)


def test_hub_directory_is_the_cached_snapshot_of_config_and_safetensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tied_dirs: tuple[Path, Path]
) -> None:
    """A hub id resolves to its snapshot in the hub cache (read offline here), whose indexed
    safetensors files are then read like a local directory's; an uncached id is refused."""
    import shutil

    import huggingface_hub.constants

    from eztinker_tasks.engine import sharded_load
    from eztinker_tasks.errors import UnknownModel

    tied, _ = tied_dirs
    cache = tmp_path / "hub"
    repo = cache / "models--eztinker-test--tied-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tied, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    directory = sharded_load.hub_directory("eztinker-test/tied-llama", local_only=True)
    assert directory == snapshot
    files = sharded_load.checkpoint_files(directory)
    assert "model.embed_tokens.weight" in files and len(set(files.values())) >= 3
    with pytest.raises(UnknownModel, match="could not fetch"):
        sharded_load.hub_directory("eztinker-test/not-cached", local_only=True)
