"""The engine's numbers against plain PyTorch references: logprobs, loss, gradients, AdamW."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from engine_helpers import (
    datum,
    encode,
    grads_copy,
    is_fp32,
    logprob_atol,
    new_run,
    params_copy,
    peft_reference,
    rel_err,
    rel_tol,
    run_state,
    train,
)

from eztinker_tasks.engine import Engine, losses
from eztinker_tasks.engine.batching import pack, validate_rows
from eztinker_tasks.engine.logprobs import target_logprobs
from eztinker_tasks.loss_specs import get_loss_spec
from eztinker_tasks.types import AdamParams, Datum, SampleSource, SamplingParams


def _batch(engine: Engine, base_model: str) -> list[Datum]:
    """Three datums of different lengths (padding) with non-trivial, partly negative weights."""
    a = encode(engine, base_model, "The river ran slowly past the old mill.")
    b = encode(engine, base_model, "Nobody kept score for long.")
    c = encode(engine, base_model, "A good recipe is a promise that can be kept, said Anna.")
    gen = torch.Generator().manual_seed(0)
    out = []
    for ids in (a, b, c):
        weights = (torch.rand(len(ids) - 1, generator=gen) * 3 - 1).tolist()  # in [-1, 2)
        out.append(datum(ids[:-1], ids[1:], weights))
    return out


def _warm_up(engine: Engine, run_id: str, base_model: str) -> None:
    """A few steps so that lora_B != 0 and every adapter gradient is non-trivial."""
    ids = encode(engine, base_model, "Some questions have short answers.")
    train(engine, run_id, [datum(ids[:-1], ids[1:])], steps=3, lr=1e-2)


def _reference(engine: Engine, run_id: str, data: list[Datum]):
    """Plain PyTorch: one unpadded forward per datum, manual float32 log-softmax, autograd."""
    run = run_state(engine, run_id)
    peft = peft_reference(engine, run_id)
    names = sorted(n for n, p in peft.named_parameters() if p.requires_grad)
    named = dict(peft.named_parameters())
    params = [named[n] for n in names]
    logprobs, total = [], torch.zeros((), dtype=torch.float64, device=params[0].device)
    for d in data:
        ids = torch.tensor([d.tokens], device=params[0].device)
        logits = peft(input_ids=ids).logits[0].float()
        targets = torch.tensor(d.loss_fn_inputs["target_tokens"], device=ids.device)
        lp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
        weights = torch.tensor(d.loss_fn_inputs["weights"], device=ids.device)
        total = total + (-weights * lp).sum()
        logprobs.append(lp.detach().cpu())
    grads = torch.autograd.grad(total, params)
    by_name = {n.replace(".default.", "."): g for n, g in zip(names, grads, strict=True)}
    return logprobs, float(total.detach()), {k: by_name[k] for k in run.params}


def test_logprobs_loss_and_grads_match_reference(engine: Engine, base_model: str) -> None:
    new_run(engine, "r", base_model, rank=8)
    _warm_up(engine, "r", base_model)
    data = _batch(engine, base_model)
    ref_lp, ref_loss, ref_grads = _reference(engine, "r", data)

    out = engine.forward_backward("r", data)

    assert len(out.loss_fn_outputs) == 3
    for got, want, d in zip(out.loss_fn_outputs, ref_lp, data, strict=True):
        assert len(got["logprobs"]) == len(d.tokens)
        torch.testing.assert_close(
            torch.tensor(got["logprobs"]), want, atol=logprob_atol(engine), rtol=0
        )
        weights = torch.tensor(d.loss_fn_inputs["weights"])
        torch.testing.assert_close(
            torch.tensor(got["elementwise_loss"]),
            -weights * torch.tensor(got["logprobs"]),
            atol=1e-5,
            rtol=1e-5,
        )
    assert math.isclose(out.metrics["loss:sum"], ref_loss, rel_tol=rel_tol(engine), abs_tol=1e-3)
    assert out.metrics["num_tokens:sum"] == sum(len(d.tokens) for d in data)
    grads = run_state(engine, "r").adapter.grads()
    assert grads.keys() == ref_grads.keys()
    for key, grad in grads.items():
        assert grad is not None, key
        assert float(ref_grads[key].norm()) > 0, key
        assert rel_err(grad, ref_grads[key]) < rel_tol(engine) * 5, key


def test_forward_matches_forward_backward_and_changes_nothing(
    engine: Engine, base_model: str
) -> None:
    new_run(engine, "r", base_model)
    _warm_up(engine, "r", base_model)
    data = _batch(engine, base_model)
    before = params_copy(engine, "r")
    info = engine.run_info("r")

    fwd = engine.forward("r", data)

    assert not run_state(engine, "r").has_grad()
    assert engine.run_info("r") == info
    for key, value in params_copy(engine, "r").items():
        assert torch.equal(value, before[key])
    fb = engine.forward_backward("r", data)
    assert fwd.metrics["loss:sum"] == pytest.approx(fb.metrics["loss:sum"], rel=rel_tol(engine))
    for a, b in zip(fwd.loss_fn_outputs, fb.loss_fn_outputs, strict=True):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=logprob_atol(engine) / 10)


def test_loss_is_a_sum_over_datums(engine: Engine, base_model: str) -> None:
    new_run(engine, "r", base_model)
    ids = encode(engine, base_model, "Good writing is mostly rewriting.")
    one = engine.forward("r", [datum(ids[:-1], ids[1:])]).metrics["loss:sum"]
    two = engine.forward("r", [datum(ids[:-1], ids[1:])] * 2).metrics["loss:sum"]
    assert two == pytest.approx(2 * one, rel=rel_tol(engine))
    assert one == pytest.approx(
        -sum(engine.forward("r", [datum(ids[:-1], ids[1:])]).loss_fn_outputs[0]["logprobs"]),
        rel=1e-5,
    )


def test_gradients_accumulate_across_calls(make_engine, base_model: str) -> None:
    engine = make_engine()
    new_run(engine, "split", base_model, seed=3)
    new_run(engine, "joint", base_model, seed=3)
    d1, d2, _ = _batch(engine, base_model)
    for run_id in ("split", "joint"):
        _warm_up(engine, run_id, base_model)

    engine.forward_backward("split", [d1])
    engine.forward_backward("split", [d2])
    engine.forward_backward("joint", [d1, d2])
    split_grads = grads_copy(engine, "split")
    joint_grads = grads_copy(engine, "joint")
    for key in split_grads:
        assert rel_err(split_grads[key], joint_grads[key]) < rel_tol(engine), key
    for run_id in ("split", "joint"):
        engine.optim_step(run_id, AdamParams(learning_rate=1e-3))
    split, joint = params_copy(engine, "split"), params_copy(engine, "joint")
    for key in split:
        assert rel_err(split[key], joint[key]) < rel_tol(engine), key


def test_optim_step_is_adamw_with_clipping(engine: Engine, base_model: str) -> None:
    new_run(engine, "r", base_model)
    _warm_up(engine, "r", base_model)
    engine.forward_backward("r", _batch(engine, base_model))
    run = run_state(engine, "r")
    ref = [p.detach().clone().requires_grad_(True) for p in run.leaves]
    for r, p in zip(ref, run.leaves, strict=True):
        assert p.grad is not None
        r.grad = p.grad.detach().clone()
    fused = engine.device.startswith("cuda")  # the engine uses the fused kernel on CUDA
    ref_opt = torch.optim.AdamW(
        ref, lr=1e-3, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.1, fused=fused
    )
    ref_opt.load_state_dict(copy.deepcopy(run.optimizer.state_dict()))  # same moments
    for group in ref_opt.param_groups:
        group.update(lr=1e-3, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.1)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(r.grad) for r in ref]))
    torch.nn.utils.clip_grad_norm_(ref, max_norm=0.5)
    ref_opt.step()

    params = AdamParams(learning_rate=1e-3, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1)
    out = engine.optim_step("r", AdamParams(**{**params.to_dict(), "grad_clip_norm": 0.5}))

    assert out.metrics["step"] == 4
    assert out.metrics["learning_rate"] == 1e-3
    assert out.metrics["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
    assert float(norm) > 0.5  # clipping really happened
    for leaf, r in zip(run.leaves, ref, strict=True):
        torch.testing.assert_close(leaf.detach(), r.detach(), rtol=1e-5, atol=1e-6)
    assert not run.has_grad()


def test_optim_step_without_gradient(engine: Engine, base_model: str) -> None:
    new_run(engine, "r", base_model)
    before = params_copy(engine, "r")
    out = engine.optim_step("r", AdamParams(learning_rate=1e-2))
    assert out.metrics["grad_norm"] == 0.0
    assert out.metrics["step"] == 1
    for key, value in params_copy(engine, "r").items():
        assert torch.equal(value, before[key])


def test_loss_inputs_reach_the_loss_as_packed_float32(
    engine: Engine, base_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Losses get every input but the targets as float32, packed [1, tokens] (no padding)."""
    seen = {}

    def spy(lp, mask, inputs, config):
        seen.update(lp=lp.detach(), mask=mask, inputs=dict(inputs), config=dict(config))
        return losses.cross_entropy(lp, mask, {}, config)

    monkeypatch.setitem(losses.LOSS_FNS, "ppo", spy)
    new_run(engine, "r", base_model)
    data = [
        datum([5, 6, 7], logprobs=[-1.0, -2.0, -3.0], advantages=[0.5, -0.5, 1.0]),
        datum([8, 9], logprobs=[-4.0, -5.0], advantages=[2.0, 3.0], weights=[1.0, 0.0]),
    ]
    out = engine.forward_backward("r", data, "ppo", {"clip_low_threshold": 0.5})
    assert seen["config"] == {"clip_low_threshold": 0.5, "clip_high_threshold": 1.2}
    assert seen["mask"].tolist() == [[True] * 5]
    assert sorted(seen["inputs"]) == ["advantages", "logprobs", "weights"]
    for tensor in seen["inputs"].values():
        assert tensor.dtype == torch.float32 and tensor.shape == (1, 5)
    assert seen["inputs"]["advantages"].tolist() == [[0.5, -0.5, 1.0, 2.0, 3.0]]
    assert seen["inputs"]["weights"].tolist() == [[1.0, 1.0, 1.0, 1.0, 0.0]]
    assert seen["lp"].dtype == torch.float32
    assert [len(o["logprobs"]) for o in out.loss_fn_outputs] == [3, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_logprobs_kernel(dtype: torch.dtype) -> None:
    """Chunked logprobs and their gradient equal log_softmax + gather (small chunks)."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 50, generator=gen) * 4).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 50, (2, 7), generator=gen)
    weights = torch.randn(2, 7, generator=gen)
    ours = target_logprobs(logits, targets, chunk_elements=3 * 50)  # 3 rows per chunk
    (ours * weights).sum().backward()
    grad = logits.grad
    logits.grad = None
    ref = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    (ref * weights).sum().backward()
    assert logits.grad is not None
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert grad is not None and grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.float(), logits.grad.float(), atol=tol, rtol=tol)


def test_engine_uses_configured_dtype(engine: Engine) -> None:
    base = engine.models.get("tiny-llama")
    assert next(base.model.parameters()).dtype == engine.dtype
    if engine.device == "cpu":
        assert is_fp32(engine)


def test_batches_are_packed_without_padding() -> None:
    spec = get_loss_spec("cross_entropy")
    cpu = torch.device("cpu")
    rows = validate_rows([datum([1, 2, 3]), datum([4], weights=[-2.0])], spec, 10, 8)
    packed = pack(rows, cpu)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0]]
    assert packed.targets.tolist() == [2, 3, 0, 0]
    assert packed.cu_seqlens.tolist() == [0, 3, 4]
    assert packed.inputs["weights"].tolist() == [1.0, 1.0, 1.0, -2.0]
    assert packed.num_tokens == 4 and packed.max_seqlen == 3


def test_ops_leave_the_matmul_precision_setting_alone(engine: Engine) -> None:
    before = torch.get_float32_matmul_precision()
    new_run(engine, "r", "tiny-llama")
    engine.forward_backward("r", [datum([5, 6, 7])])
    engine.sample(SampleSource(run_id="r"), [5, 6], 2, SamplingParams(max_tokens=3))
    assert torch.get_float32_matmul_precision() == before
