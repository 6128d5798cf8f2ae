"""Checkpoints: exact resume, the PEFT format round trip, atomic writes, listing, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_helpers import (
    SENTENCE,
    assert_same_tensors,
    encode,
    exact_device,
    logprob_atol,
    new_run,
    params_copy,
    run_state,
    sequence_datum,
    train,
)
from peft import PeftModel
from transformers import AutoModelForCausalLM

from eztinker_tasks.engine import Engine, checkpoints
from eztinker_tasks.engine.adapters import input_embedding_weight
from eztinker_tasks.errors import CheckpointNotFound, Conflict, InvalidRequest
from eztinker_tasks.types import AdamParams, SampleSource, SamplingParams


def _floats(values: list[float | None]) -> list[float]:
    assert all(v is not None for v in values)
    return [float(v) for v in values if v is not None]


def _data(engine: Engine, base_model: str):
    return [
        sequence_datum(encode(engine, base_model, SENTENCE)),
        sequence_datum(encode(engine, base_model, "She opened the letter carefully.")),
    ]


def _steps(engine: Engine, run_id: str, data, n: int) -> None:
    for i in range(n):
        engine.forward_backward(run_id, data[i % len(data) :][:1])
        engine.optim_step(run_id, AdamParams(learning_rate=2e-3, weight_decay=0.01))


def test_resume_from_state_is_exact(engine: Engine, base_model: str) -> None:
    data = _data(engine, base_model)
    new_run(engine, "orig", base_model, rank=8)
    _steps(engine, "orig", data, 3)
    ckpt = engine.save_state("orig", "step3")
    assert (ckpt.kind, ckpt.step, ckpt.path, ckpt.base_model) == (
        "state",
        3,
        "orig/step3",
        base_model,
    )
    _steps(engine, "orig", data, 4)
    sample = SamplingParams(max_tokens=6, temperature=1.0)  # no seed: the run's own RNG
    expected_sample = engine.sample(SampleSource(run_id="orig"), data[0].tokens[:2], 2, sample)
    expected = params_copy(engine, "orig")

    info = engine.create_run_from_checkpoint("resumed", "orig/step3")
    assert (info.step, info.base_model, info.lora) == (3, base_model, engine.run_info("orig").lora)
    assert info.optimizer_bytes == engine.run_info("orig").optimizer_bytes
    _steps(engine, "resumed", data, 4)
    assert_same_tensors(params_copy(engine, "resumed"), expected, exact=exact_device(engine))
    got_sample = engine.sample(SampleSource(run_id="resumed"), data[0].tokens[:2], 2, sample)
    if exact_device(engine):
        assert got_sample == expected_sample  # the run's RNG state was restored too
    else:
        assert [s.tokens for s in got_sample.sequences] == [
            s.tokens for s in expected_sample.sequences
        ]

    # Loading into the same run rewinds it too.
    engine.load_state("orig", "eztinker://orig/step3")
    assert engine.run_info("orig").step == 3
    _steps(engine, "orig", data, 4)
    assert_same_tensors(params_copy(engine, "orig"), expected, exact=exact_device(engine))


def test_load_weights_without_optimizer(engine: Engine, base_model: str) -> None:
    data = _data(engine, base_model)
    new_run(engine, "a", base_model)
    _steps(engine, "a", data, 2)
    engine.save_weights_for_sampler("a", "w")
    saved = params_copy(engine, "a")
    engine.forward_backward("a", data)  # pending gradients are dropped by a load
    _steps(engine, "a", data, 2)
    info = engine.load_state("a", "a/w", optimizer=False)
    assert info.step == 2 and info.optimizer_bytes == 0
    assert not run_state(engine, "a").has_grad()
    assert_same_tensors(params_copy(engine, "a"), saved)
    with pytest.raises(InvalidRequest, match="no optimizer state"):
        engine.load_state("a", "a/w", optimizer=True)
    with pytest.raises(InvalidRequest, match="no optimizer state"):
        engine.create_run_from_checkpoint("b", "a/w")
    assert not engine.has_run("b")
    engine.create_run_from_checkpoint("b", "a/w", optimizer=False)
    assert_same_tensors(params_copy(engine, "b"), saved)


def test_sampler_checkpoint_is_plain_peft(engine: Engine, base_model: str) -> None:
    ids = encode(engine, base_model, SENTENCE)
    new_run(engine, "r", base_model)
    train(engine, "r", [sequence_datum(ids)], steps=5, lr=1e-2)
    info = engine.save_weights_for_sampler("r", "final")
    directory = Path(info.directory)
    tied = engine.models.get(base_model).tied_unembedding
    assert sorted(p.name for p in directory.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "eztinker_sampler.json",
        *(["eztinker_unembed_lora.safetensors"] if tied else []),
    ]
    base_dir = engine.models.get(base_model).source
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base_dir
    assert Path(base_dir).is_absolute() and (Path(base_dir) / "config.json").is_file()
    assert config["r"] == 8 and config["lora_alpha"] == 32
    meta = json.loads((directory / "eztinker_sampler.json").read_text())
    assert (meta["kind"], meta["step"], meta["base_model"]) == ("sampler", 5, base_model)

    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=engine.dtype)
    peft = PeftModel.from_pretrained(plain, str(directory)).to(engine.device).eval()
    with torch.no_grad():
        logits = peft(input_ids=torch.tensor([ids], device=engine.device)).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1).gather(
        1, torch.tensor(ids[1:], device=logits.device)[:, None]
    )
    expected = engine.compute_logprobs(SampleSource(run_id="r"), ids)[1:]
    assert lp.squeeze(1).tolist() == pytest.approx(expected, abs=logprob_atol(engine))
    base_lp = engine.compute_logprobs(SampleSource(base_model=base_model), ids)[1:]
    assert max(abs(a - b) for a, b in zip(_floats(expected), _floats(base_lp), strict=True)) > 0.1


@pytest.mark.parametrize("kind", ["sampler", "state"])
def test_exported_adapter_merges_into_the_trained_model(
    engine: Engine, base_model: str, kind: str
) -> None:
    """Plain PEFT load AND merge_and_unload give the run's logprobs; on a tied base (tiny-gpt2)
    the input embedding stays the base's (the lm_head delta is not an embedding delta)."""
    ids = encode(engine, base_model, SENTENCE)
    new_run(engine, "r", base_model)  # trains attention, MLP and the unembedding
    train(engine, "r", [sequence_datum(ids)], steps=5, lr=1e-2)
    save = engine.save_weights_for_sampler if kind == "sampler" else engine.save_state
    directory = save("r", "export").directory
    expected = torch.tensor(_floats(engine.compute_logprobs(SampleSource(run_id="r"), ids)[1:]))
    config = json.loads((Path(directory) / "adapter_config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(
        config["base_model_name_or_path"], dtype=engine.dtype
    )
    embedding = input_embedding_weight(plain).clone()

    def logprobs(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids], device=engine.device)).logits[0].float()
        targets = torch.tensor(ids[1:], device=logits.device)[:, None]
        return torch.log_softmax(logits[:-1], -1).gather(1, targets).squeeze(1).cpu()

    peft = PeftModel.from_pretrained(plain, directory).to(engine.device).eval()
    assert logprobs(peft).tolist() == pytest.approx(expected.tolist(), abs=logprob_atol(engine))
    merged = peft.merge_and_unload()
    assert logprobs(merged).tolist() == pytest.approx(expected.tolist(), abs=logprob_atol(engine))
    assert torch.equal(input_embedding_weight(merged).cpu(), embedding.cpu())


def test_checkpoint_files_and_listing(engine: Engine, base_model: str) -> None:
    new_run(engine, "r", base_model)
    new_run(engine, "q", base_model)
    state = engine.save_state("r", "s1")
    engine.save_weights_for_sampler("r", "w1")
    engine.save_state("q", "s1")
    names = sorted(p.name for p in Path(state.directory).iterdir())
    tied = engine.models.get(base_model).tied_unembedding
    assert names == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "eztinker_state.json",
        *(["eztinker_unembed_lora.safetensors"] if tied else []),
        "optimizer.json",
        "optimizer.safetensors",
    ]
    assert all(n.endswith((".json", ".safetensors")) for n in names)  # never pickle
    assert state.size_bytes == sum(p.stat().st_size for p in Path(state.directory).iterdir())
    assert [c.path for c in engine.list_checkpoints("r")] == ["r/s1", "r/w1"]
    assert sorted(c.path for c in engine.list_checkpoints()) == ["q/s1", "r/s1", "r/w1"]
    assert engine.list_checkpoints("nobody") == []
    meta = json.loads((Path(state.directory) / "eztinker_state.json").read_text())
    assert meta["lora"]["rank"] == 8 and meta["base_model"] == base_model
    assert "rng_state" in meta

    engine.delete_checkpoint("r/w1")
    assert [c.path for c in engine.list_checkpoints("r")] == ["r/s1"]
    with pytest.raises(CheckpointNotFound):
        engine.delete_checkpoint("r/w1")


def test_saving_again_replaces_atomically(engine: Engine, base_model: str) -> None:
    data = _data(engine, base_model)
    new_run(engine, "r", base_model)
    first = engine.save_state("r", "latest")
    _steps(engine, "r", data, 2)
    second = engine.save_state("r", "latest")
    assert second.step == 2 and second.created_at >= first.created_at
    assert [c.step for c in engine.list_checkpoints("r")] == [2]
    run_dir = Path(second.directory).parent
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.endswith(".lock")) == ["latest"]


def test_a_crash_while_saving_leaves_no_checkpoint(
    engine: Engine, base_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    new_run(engine, "r", base_model)
    engine.save_state("r", "kept")

    write = checkpoints.save_file

    def explode(tensors, filename, *args, **kwargs):  # the disk fills up mid-checkpoint
        if filename.endswith(checkpoints.OPTIMIZER_TENSORS):
            raise OSError("disk full")
        return write(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        engine.save_state("r", "broken")
    with pytest.raises(OSError, match="disk full"):
        engine.save_state("r", "kept")  # a failed overwrite keeps the old checkpoint
    assert [c.path for c in engine.list_checkpoints("r")] == ["r/kept"]
    run_dir = Path(engine.config.checkpoints_dir) / "r"
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.endswith(".lock")) == ["kept"]
    with pytest.raises(CheckpointNotFound):
        engine.create_run_from_checkpoint("x", "r/broken")


def test_checkpoint_errors(engine: Engine) -> None:
    new_run(engine, "g", "tiny-gpt2", rank=8)
    new_run(engine, "l", "tiny-llama", rank=8)
    new_run(engine, "l4", "tiny-llama", rank=4)
    new_run(engine, "lmlp", "tiny-llama", rank=8, train_mlp=False)
    engine.save_state("l", "s")
    before = params_copy(engine, "g")
    with pytest.raises(InvalidRequest, match="tiny-llama"):
        engine.load_state("g", "l/s")
    with pytest.raises(InvalidRequest, match="rank"):
        engine.load_state("l4", "l/s")
    with pytest.raises(InvalidRequest, match="train_mlp"):
        engine.load_state("lmlp", "l/s")
    with pytest.raises(CheckpointNotFound):
        engine.load_state("l", "l/missing")
    with pytest.raises(InvalidRequest):
        engine.save_state("l", "../escape")
    with pytest.raises(InvalidRequest):
        engine.save_state("l", ".hidden")
    with pytest.raises(InvalidRequest):
        engine.load_state("l", "not-a-path")
    with pytest.raises(Conflict):
        engine.create_run_from_checkpoint("l", "l/s")
    assert_same_tensors(params_copy(engine, "g"), before)
    assert engine.run_info("l4").step == 0


def test_snapshot_captured_then_written_restores_the_run_exactly(
    engine: Engine, base_model: str, tmp_path: Path
) -> None:
    """capture_state copies the state at once; training on after it does not change what is
    written later; restore_run rebuilds the run exactly (weights, optimizer, step, RNG)."""
    data = _data(engine, base_model)
    new_run(engine, "live", base_model, rank=8, seed=3)
    _steps(engine, "live", data, 2)
    captured = engine.capture_state("live")
    at_capture = params_copy(engine, "live")
    _steps(engine, "live", data, 1)  # moves on before the snapshot is written
    directory = tmp_path / "snap"
    directory.mkdir()
    captured.write(directory)
    info = engine.restore_run("back", directory)
    assert (info.step, info.lora.seed) == (2, 3)
    restored = params_copy(engine, "back")
    assert_same_tensors(at_capture, restored, exact=exact_device(engine))
    # Both runs take the same next step from the captured state: the optimizer came back too.
    new_run(engine, "ref", base_model, rank=8, seed=3)
    _steps(engine, "ref", data, 2)
    _steps(engine, "ref", data, 1)
    _steps(engine, "back", data, 1)
    assert_same_tensors(
        params_copy(engine, "ref"), params_copy(engine, "back"), exact=exact_device(engine)
    )
    gen = SamplingParams(max_tokens=6, temperature=1.0)
    prompt = encode(engine, base_model, SENTENCE)
    drawn = [
        engine.sample(SampleSource(run_id=r), prompt, 2, gen).sequences for r in ("ref", "back")
    ]
    assert [s.tokens for s in drawn[0]] == [s.tokens for s in drawn[1]]  # same RNG state
    with pytest.raises(Conflict):
        engine.restore_run("back", directory)
    with pytest.raises(CheckpointNotFound):
        engine.restore_run("nothing", tmp_path / "absent")
