"""Runs on a shared base: learning, isolation, ranks, seeds, deletion and memory."""

from __future__ import annotations

import gc
import weakref

import torch
from engine_helpers import (
    SENTENCE,
    encode,
    grad_of,
    grads_copy,
    new_run,
    params_copy,
    run_state,
    sequence_datum,
    train,
)

from eztinker_tasks.engine import Engine
from eztinker_tasks.types import LoraSpec, SampleSource, SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, stop=())


def test_run_memorises_a_sentence(engine: Engine, base_model: str) -> None:
    ids = encode(engine, base_model, SENTENCE)
    new_run(engine, "r", base_model, rank=16)
    params = SamplingParams(max_tokens=len(ids) - 1, temperature=0.0, stop=())
    losses = train(engine, "r", [sequence_datum(ids)], steps=40, lr=3e-3)

    assert losses[-1] < 0.05 * losses[0]
    run_out = engine.sample(SampleSource(run_id="r"), ids[:1], 1, params)
    base_out = engine.sample(SampleSource(base_model=base_model), ids[:1], 1, params)
    assert run_out.sequences[0].tokens == ids[1:]
    assert base_out.sequences[0].tokens != ids[1:]
    assert engine.run_info("r").step == 40
    assert engine.run_info("r").tokens_trained == 40 * (len(ids) - 1)


def test_training_one_run_leaves_others_and_base_bit_identical(
    engine: Engine, base_model: str
) -> None:
    ids = encode(engine, base_model, SENTENCE)
    probe = encode(engine, base_model, "Every map leaves something out.")
    new_run(engine, "a", base_model, seed=1)
    new_run(engine, "b", base_model, seed=2)
    train(engine, "b", [sequence_datum(probe)], steps=2, lr=1e-2)  # b is not at its init
    b_params = params_copy(engine, "b")
    b_before = engine.forward("b", [sequence_datum(probe)]).loss_fn_outputs
    base_before = engine.compute_logprobs(SampleSource(base_model=base_model), probe)
    engine.forward_backward("b", [sequence_datum(probe)])  # b has pending gradients
    b_grads = grads_copy(engine, "b")

    train(engine, "a", [sequence_datum(ids)], steps=5, lr=1e-2)

    assert engine.forward("b", [sequence_datum(probe)]).loss_fn_outputs == b_before
    assert engine.compute_logprobs(SampleSource(base_model=base_model), probe) == base_before
    for key, value in params_copy(engine, "b").items():
        assert torch.equal(value, b_params[key])
        assert torch.equal(grad_of(engine, "b", key), b_grads[key])
    assert engine.forward("a", [sequence_datum(probe)]).loss_fn_outputs != b_before


def test_runs_with_different_ranks_share_one_base(engine: Engine, base_model: str) -> None:
    new_run(engine, "small", base_model, rank=2)
    new_run(engine, "big", base_model, rank=24, train_mlp=False, train_unembed=False)
    base = engine.models.get(base_model)
    small, big = run_state(engine, "small"), run_state(engine, "big")
    assert small.base is big.base is base
    assert {p.shape[0] for k, p in small.params.items() if ".lora_A." in k} == {2}
    assert {p.shape[0] for k, p in big.params.items() if ".lora_A." in k} == {24}
    assert all(".mlp." not in k and "lm_head" not in k for k in big.params)
    assert any(".mlp." in k for k in small.params) and any("lm_head" in k for k in small.params)
    ids = encode(engine, base_model, SENTENCE)
    for run_id in ("small", "big"):
        losses = train(engine, run_id, [sequence_datum(ids)], steps=5, lr=3e-3)
        assert losses[-1] < losses[0]
    info = engine.run_info("big")
    assert info.lora.rank == 24 and info.trainable_params == sum(
        p.numel() for p in big.params.values()
    )


def test_memory_per_run_is_adapter_plus_optimizer(engine: Engine, base_model: str) -> None:
    new_run(engine, "r", base_model, rank=8)
    info = engine.run_info("r")
    assert info.adapter_bytes == 4 * info.trainable_params  # float32 adapters
    assert info.optimizer_bytes == 0  # AdamW state appears at the first step
    train(engine, "r", [sequence_datum(encode(engine, base_model, SENTENCE))], steps=1)
    info = engine.run_info("r")
    # exp_avg + exp_avg_sq of the adapter, plus one 4-byte step counter per leaf tensor (the
    # adapter's A factors and its B factors are one flat tensor each)
    assert info.optimizer_bytes == 2 * info.adapter_bytes + 4 * 2
    stats = engine.memory_stats()
    assert stats["adapter_bytes"] == info.adapter_bytes
    assert stats["optimizer_bytes"] == info.optimizer_bytes
    base = engine.models.get(base_model)
    assert stats["base_params_bytes"] == base.param_bytes
    assert sum(p.numel() for p in base.model.parameters() if not p.requires_grad) > (
        10 * info.trainable_params
    )


def test_delete_run_frees_its_memory(engine: Engine, base_model: str) -> None:
    ids = encode(engine, base_model, SENTENCE)
    base_lp = engine.compute_logprobs(SampleSource(base_model=base_model), ids)
    new_run(engine, "keep", base_model)
    new_run(engine, "gone", base_model)
    train(engine, "gone", [sequence_datum(ids)], steps=2, lr=1e-2)
    param = next(iter(run_state(engine, "gone").params.values()))
    ref = weakref.ref(param)
    del param
    engine.delete_run("gone")
    gc.collect()

    assert ref() is None
    assert not engine.has_run("gone") and engine.list_runs() == ["keep"]
    assert engine.memory_stats()["num_runs"] == 1
    base = engine.models.get(base_model)
    engine.delete_run("keep")
    # The base holds no adapter weights of its own: only the runs do, and they are gone.
    assert not any("lora" in name for name, _ in base.model.named_parameters())
    assert base.context.route is None
    assert engine.compute_logprobs(SampleSource(base_model=base_model), ids) == base_lp
    new_run(engine, "again", base_model)
    assert train(engine, "again", [sequence_datum(ids)], steps=2)[0] > 0


def test_lora_seed(engine: Engine, base_model: str) -> None:
    cpu_rng = torch.get_rng_state()
    new_run(engine, "a", base_model, seed=7)
    new_run(engine, "b", base_model, seed=7)
    new_run(engine, "c", base_model, seed=8)
    engine.create_run("d", base_model, LoraSpec(rank=8, seed=None))
    assert torch.equal(torch.get_rng_state(), cpu_rng)  # global RNG untouched
    a, b, c = params_copy(engine, "a"), params_copy(engine, "b"), params_copy(engine, "c")
    key = next(k for k in a if ".lora_A." in k)
    assert torch.equal(a[key], b[key])
    assert not torch.equal(a[key], c[key])
    assert all(torch.count_nonzero(v) == 0 for k, v in a.items() if ".lora_B." in k)
    seed = engine.run_info("d").lora.seed
    assert isinstance(seed, int)
    new_run(engine, "d2", base_model, seed=seed)
    assert torch.equal(params_copy(engine, "d")[key], params_copy(engine, "d2")[key])
    assert engine.run_info("a").lora.alpha == 32.0


def test_list_and_info(engine: Engine) -> None:
    new_run(engine, "x", "tiny-llama", rank=4)
    new_run(engine, "w", "tiny-gpt2", rank=4)
    assert engine.list_runs() == ["w", "x"]
    assert engine.has_run("x") and not engine.has_run("y")
    info = engine.run_info("x")
    assert (info.run_id, info.base_model, info.step, info.last_loss) == ("x", "tiny-llama", 0, None)
    assert info.to_dict()["lora"]["rank"] == 4
