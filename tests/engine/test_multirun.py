"""Many runs in ONE packed pass (issue 11): each run gets exactly what a pass of its own gives.

Two engines hold identical runs (same seeds, same warm-up): one runs the calls of all runs
together (``Engine.run_calls``), the other each call alone; logprobs, losses, metrics and
gradients must agree (CPU float32: logprobs abs <= 1e-5, gradients rel <= 1e-4).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from engine_helpers import (
    DEVICE,
    DTYPE,
    datum,
    encode,
    grads_copy,
    new_run,
    rel_err,
    run_state,
    train,
)

from eztinker_tasks.engine import Engine
from eztinker_tasks.engine.fused_logprobs import UnembedSegment, unembed_logprobs
from eztinker_tasks.engine.multilora import Adapter, LoraRoute, Segment, _grouped_delta
from eztinker_tasks.errors import EZTinkerError, InvalidRequest, NonFiniteValue
from eztinker_tasks.types import CallSpec, ForwardBackwardOutput

RANKS = {"r4": 4, "r16": 16, "r64": 64}
LOSSES = {
    "cross_entropy": None,
    "importance_sampling": None,
    "ppo": None,
    "cispo": None,
    "dro": {"beta": 0.05},
}


def _runs(engine: Engine, base_model: str) -> None:
    for i, (run_id, rank) in enumerate(RANKS.items()):
        new_run(engine, run_id, base_model, rank=rank, seed=10 + i)
        ids = encode(engine, base_model, f"Warm-up sentence number {i} for the adapter.")
        train(engine, run_id, [datum(ids[:-1], ids[1:])], steps=2, lr=1e-2)


def _data(engine: Engine, base_model: str, run_index: int, loss_fn: str):
    gen = torch.Generator().manual_seed(100 + run_index)
    out = []
    for text in (f"Run {run_index} reads a short line.", f"And {run_index} writes another one."):
        ids = encode(engine, base_model, text)
        n = len(ids) - 1
        extra = {}
        if loss_fn != "cross_entropy":
            extra = {
                "logprobs": (-torch.rand(n, generator=gen) * 6 - 2).tolist(),
                "advantages": (torch.randn(n, generator=gen)).tolist(),
            }
        weights = [0.0, *(torch.rand(n - 1, generator=gen) + 0.5).tolist()]
        out.append(datum(ids[:-1], ids[1:], weights, **extra))
    return out


@pytest.fixture
def twins(make_engine: Callable[..., Engine], base_model: str) -> tuple[Engine, Engine, str]:
    together, alone = make_engine(), make_engine()
    _runs(together, base_model)
    _runs(alone, base_model)
    return together, alone, base_model


# The bounds in float32 (CPU); bf16 on CUDA (grouped vs plain matmuls round
# differently) gets the engine suite's bf16 bounds.
FP32 = (DTYPE in ("auto", "float32") and DEVICE == "cpu") or DTYPE == "float32"
LP_ATOL, GRAD_RTOL = (1e-5, 1e-4) if FP32 else (6e-2, 5e-2)


def _assert_same_output(got: ForwardBackwardOutput, want: ForwardBackwardOutput) -> None:
    assert len(got.loss_fn_outputs) == len(want.loss_fn_outputs)
    for g, w in zip(got.loss_fn_outputs, want.loss_fn_outputs, strict=True):
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=LP_ATOL)
        assert g["elementwise_loss"] == pytest.approx(w["elementwise_loss"], abs=LP_ATOL * 10)
    assert got.metrics.keys() == want.metrics.keys()
    for key in want.metrics:
        tol = 1e-5 if FP32 else 5e-2
        assert got.metrics[key] == pytest.approx(want.metrics[key], rel=tol, abs=tol), key


@pytest.mark.parametrize("loss_fn", list(LOSSES))
def test_a_pass_mixing_ranks_4_16_64_equals_solo_passes(twins, loss_fn: str) -> None:
    together, alone, base_model = twins
    specs = [
        CallSpec(run_id, _data(together, base_model, i, loss_fn), loss_fn, LOSSES[loss_fn])
        for i, run_id in enumerate(RANKS)
    ]
    mixed = together.run_calls(specs)
    for spec, got in zip(specs, mixed, strict=True):
        assert isinstance(got, ForwardBackwardOutput), got
        assert got.batch is not None and got.batch["runs"] == 3
        want = alone.forward_backward(spec.run_id, spec.data, loss_fn, LOSSES[loss_fn])
        assert want.batch is not None and want.batch["runs"] == 1
        _assert_same_output(got, want)
        a, b = grads_copy(together, spec.run_id), grads_copy(alone, spec.run_id)
        for key in b:
            assert rel_err(a[key], b[key]) <= GRAD_RTOL, key


def test_forward_calls_of_many_runs_share_a_pass_and_change_nothing(twins) -> None:
    together, alone, base_model = twins
    specs = [
        CallSpec(run_id, _data(together, base_model, i, "cross_entropy"), backward=False)
        for i, run_id in enumerate(RANKS)
    ]
    for spec, got in zip(specs, together.run_calls(specs), strict=True):
        assert isinstance(got, ForwardBackwardOutput)
        _assert_same_output(got, alone.forward(spec.run_id, spec.data))
        assert not run_state(together, spec.run_id).has_grad()


def test_calls_on_two_bases_and_a_bad_call_each_get_their_own_answer(
    make_engine: Callable[..., Engine],
) -> None:
    engine = make_engine()
    new_run(engine, "g", "tiny-gpt2")
    new_run(engine, "l", "tiny-llama")
    good = [datum([5, 6, 7, 8])]
    out = engine.run_calls(
        [
            CallSpec("g", good),
            CallSpec("l", good),
            CallSpec("g", [datum([5, 99999])]),  # outside the vocabulary
            CallSpec("nope", good),
        ]
    )
    assert isinstance(out[0], ForwardBackwardOutput) and isinstance(out[1], ForwardBackwardOutput)
    assert out[0].batch is not None and out[0].batch["runs"] == 1  # other base: its own pass
    assert isinstance(out[2], InvalidRequest) and "vocabulary" in out[2].message
    assert isinstance(out[3], EZTinkerError) and out[3].code == "unknown_run"


def test_a_non_finite_run_fails_alone_and_the_others_train(twins) -> None:
    together, alone, base_model = twins
    ok = _data(together, base_model, 0, "importance_sampling")
    bad = [datum(d.tokens, d.loss_fn_inputs["target_tokens"]) for d in ok]
    n = len(bad[0].tokens)
    bad_inputs = {
        "logprobs": [-1e30] * n,  # exp(lp + 1e30) overflows wherever the weight is not 0
        "advantages": [1.0] * n,
    }
    bad = [datum(bad[0].tokens, bad[0].loss_fn_inputs["target_tokens"], **bad_inputs)]
    before = grads_copy(together, "r16") if run_state(together, "r16").has_grad() else None
    out = together.run_calls(
        [
            CallSpec("r4", ok, "importance_sampling"),
            CallSpec("r16", bad, "importance_sampling"),
            CallSpec("r64", ok, "importance_sampling"),
        ]
    )
    assert isinstance(out[1], NonFiniteValue) and "data[0] position" in out[1].message
    assert before is None and not run_state(together, "r16").has_grad()
    for run_id, got in (("r4", out[0]), ("r64", out[2])):
        assert isinstance(got, ForwardBackwardOutput)
        want = alone.forward_backward(run_id, ok, "importance_sampling")
        _assert_same_output(got, want)


def test_a_guilty_call_does_not_take_the_innocent_calls_of_its_run_down(twins) -> None:
    together, alone, base_model = twins
    ok = _data(together, base_model, 0, "cross_entropy")
    huge = [datum(ok[0].tokens, ok[0].loss_fn_inputs["target_tokens"], [3e38] * len(ok[0].tokens))]
    out = together.run_calls([CallSpec("r4", ok), CallSpec("r4", huge), CallSpec("r4", ok)])
    assert isinstance(out[1], NonFiniteValue)
    assert isinstance(out[0], ForwardBackwardOutput) and isinstance(out[2], ForwardBackwardOutput)
    alone.forward_backward("r4", ok)
    alone.forward_backward("r4", ok)
    a, b = grads_copy(together, "r4"), grads_copy(alone, "r4")
    for key in b:
        assert rel_err(a[key], b[key]) <= GRAD_RTOL, key


def test_sequences_in_a_pass_never_see_each_other(engine: Engine, base_model: str) -> None:
    new_run(engine, "r", base_model, rank=8)
    first = datum([5, 17, 42, 99, 7])
    lp = engine.forward("r", [first, datum([300, 12, 64])]).loss_fn_outputs[0]["logprobs"]
    other = engine.forward("r", [datum([1, 2, 3, 4, 5, 6, 7, 8]), first]).loss_fn_outputs[1]
    assert other["logprobs"] == pytest.approx(lp, abs=LP_ATOL / 10)
    alone = engine.forward("r", [first]).loss_fn_outputs[0]["logprobs"]
    assert alone == pytest.approx(lp, abs=LP_ATOL / 10)


def test_activation_checkpointing_gives_the_same_gradient(
    make_engine: Callable[..., Engine], base_model: str
) -> None:
    plain, recompute = (
        make_engine(activation_checkpointing="never"),
        make_engine(activation_checkpointing="always"),
    )
    for engine in (plain, recompute):
        new_run(engine, "r", base_model, rank=8, seed=3)
        train(engine, "r", [datum([5, 6, 7, 8, 9])], steps=1, lr=1e-2)
    data = [datum([5, 17, 42, 99, 7]), datum([300, 12, 64])]
    got = recompute.forward_backward("r", data)
    want = plain.forward_backward("r", data)
    assert got.batch is not None and got.batch["activation_checkpointing"] is True
    _assert_same_output(got, want)
    a, b = grads_copy(recompute, "r"), grads_copy(plain, "r")
    for key in b:
        assert rel_err(a[key], b[key]) <= GRAD_RTOL / 10, key


def _adapter(rank: int, d_in: int, d_out: int, seed: int, dtype=torch.float32) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    adapter = Adapter(f"a{seed}", rank, 2.0 * rank, {"layer": (d_in, d_out)}, "cpu")
    with torch.no_grad():
        for leaf in adapter.leaves:
            leaf.copy_(torch.randn(leaf.shape, generator=gen))
    adapter.requires_grad_(True)
    return adapter


def test_grouped_lora_delta_equals_a_loop_over_adapters() -> None:
    """The grouped shrink/expand (as CUDA runs it) against a plain per-adapter loop."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no grouped matmul")
    x = torch.randn(12, 16, dtype=torch.float32)
    adapters = [_adapter(r, 16, 24, seed) for seed, r in enumerate((4, 8, 2))]
    route = LoraRoute(
        [
            Segment(adapters[0], 0, 3),
            Segment(None, 3, 5),
            Segment(adapters[1], 5, 10),
            Segment(adapters[2], 10, 12),
        ],
        torch.float32,
    )
    try:
        got = _grouped_delta(x, "layer", route, 24)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"grouped matmul not available on this device/dtype: {exc}")
    pieces = []
    for seg in route.segments:
        rows = x[seg.start : seg.stop]
        if seg.adapter is None:
            pieces.append(torch.zeros(rows.shape[0], 24))
            continue
        r = seg.adapter.rank  # fresh views of the leaves (one layer: the whole leaf)
        a, b = seg.adapter.flat_a.view(16, r).t(), seg.adapter.flat_b.view(r, 24).t()
        pieces.append(rows @ a.t() @ b.t() * seg.adapter.scale)
    want = torch.cat(pieces)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    weights = torch.randn_like(want)
    leaves = [leaf for adapter in adapters for leaf in adapter.leaves]
    grads_got = torch.autograd.grad((got * weights).sum(), leaves)
    grads_want = torch.autograd.grad((want * weights).sum(), leaves)
    for g, w in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_unembedding_logprobs_and_gradients_equal_full_logits() -> None:
    """Chunked logprobs from hidden states (with a per-segment lm_head LoRA) == autograd."""
    gen = torch.Generator().manual_seed(0)
    n, d, vocab = 9, 8, 40
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(vocab, d, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    a = torch.randn(3, d, generator=gen, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(vocab, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    scale = 2.0
    segments = [UnembedSegment(0, 4, (a, b, scale)), UnembedSegment(4, n, None)]
    got = unembed_logprobs(hidden, weight, None, targets, segments, chunk_elements=2 * vocab)
    logits = hidden @ weight.t()
    delta = torch.cat([(hidden[:4] @ a.t() @ b.t()) * scale, torch.zeros(n - 4, vocab)])
    want = torch.log_softmax(logits + delta, -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    got_grads = torch.autograd.grad((got.double() * g).sum(), [hidden, a, b])
    want_grads = torch.autograd.grad((want * g).sum(), [hidden, a, b])
    for x, y in zip(got_grads, want_grads, strict=True):
        assert math.isfinite(float(x.abs().max()))
        torch.testing.assert_close(x.double(), y, atol=1e-5, rtol=1e-5)


def test_an_overflow_inside_the_model_is_pinned_on_the_call_that_caused_it(twins) -> None:
    """Huge weights give a finite loss but a gradient that overflows inside the model: no
    token shows it, so the run's calls are run again one by one; only the culprit fails."""
    together, alone, base_model = twins
    ok = _data(together, base_model, 0, "cross_entropy")
    n = len(ok[0].tokens)
    huge = [datum(ok[0].tokens, ok[0].loss_fn_inputs["target_tokens"], [1e30] * n)]
    out = together.run_calls([CallSpec("r4", ok), CallSpec("r4", huge), CallSpec("r16", ok)])
    assert isinstance(out[1], NonFiniteValue), out[1]
    assert "largest |weights| 1e+30" in out[1].message
    assert isinstance(out[0], ForwardBackwardOutput) and isinstance(out[2], ForwardBackwardOutput)
    alone.forward_backward("r4", ok)
    a, b = grads_copy(together, "r4"), grads_copy(alone, "r4")
    for key in b:
        assert rel_err(a[key], b[key]) <= GRAD_RTOL, key
