"""Sampling: batching with one prefill, stops, seeds, logprob semantics, sources, errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from engine_helpers import (
    SENTENCE,
    encode,
    logprob_atol,
    new_engine,
    new_run,
    peft_reference,
    sequence_datum,
    train,
)
from transformers import PreTrainedModel

from eztinker_tasks.engine import Engine, EngineConfig
from eztinker_tasks.engine.sampler import _filter
from eztinker_tasks.errors import CheckpointNotFound, InvalidRequest, OperationTimeout, UnknownRun
from eztinker_tasks.types import SampleSource, SamplingParams

RUN = SampleSource(run_id="r")


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def trained(request, data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An engine whose run "r" has memorised SENTENCE followed by EOS."""
    base_model = request.param
    engine = new_engine(data_dir, tmp_path_factory.mktemp("ckpt"))
    eos = engine.model_info(base_model).eos_token_id
    assert eos is not None
    ids = [*encode(engine, base_model, SENTENCE), eos]
    new_run(engine, "r", base_model, rank=16)
    train(engine, "r", [sequence_datum(ids)], steps=40, lr=3e-3)
    assert engine.sample(RUN, ids[:1], 1, greedy(len(ids))).sequences[0].tokens == ids[1:]
    return engine, base_model, ids


def greedy(max_tokens: int, stop=None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)


def test_eos_stops_unless_stop_is_empty(trained) -> None:
    engine, _, ids = trained
    out = engine.sample(RUN, ids[:1], 1, greedy(30)).sequences[0]
    assert out.tokens == ids[1:] and out.stop_reason == "stop"
    assert len(out.logprobs) == len(out.tokens)
    out = engine.sample(RUN, ids[:1], 1, greedy(30, stop=())).sequences[0]
    assert out.tokens[: len(ids) - 1] == ids[1:]
    assert len(out.tokens) == 30 and out.stop_reason == "length"
    out = engine.sample(RUN, ids[:1], 1, greedy(4)).sequences[0]
    assert out.tokens == ids[1:5] and out.stop_reason == "length"


def test_stop_token_ids(trained) -> None:
    engine, _, ids = trained
    target = ids[1:]
    stop_id = target[4]
    cut = target.index(stop_id) + 1
    out = engine.sample(RUN, ids[:1], 1, greedy(30, stop=(stop_id,))).sequences[0]
    assert out.tokens == target[:cut] and out.stop_reason == "stop"
    # a non-empty stop list keeps EOS as a stop
    out = engine.sample(RUN, ids[:1], 1, greedy(30, stop=(1999,))).sequences[0]
    assert out.tokens == target and out.stop_reason == "stop"


def test_stop_strings(trained) -> None:
    engine, base_model, ids = trained
    tokenizer = engine.models.get(base_model).tokenizer
    out = engine.sample(RUN, ids[:1], 1, greedy(30, stop=("lazy",))).sequences[0]
    text = tokenizer.decode(out.tokens)
    assert out.stop_reason == "stop"
    assert "lazy" in text
    assert "lazy" not in tokenizer.decode(out.tokens[:-1])
    assert out.tokens == ids[1 : 1 + len(out.tokens)]
    # a string that never appears: EOS still stops
    out = engine.sample(RUN, ids[:1], 1, greedy(30, stop=("zzz", 1999))).sequences[0]
    assert out.tokens == ids[1:] and out.stop_reason == "stop"


def test_seed_gives_the_same_samples(trained) -> None:
    engine, base_model, ids = trained
    for source in (RUN, SampleSource(base_model=base_model)):
        params = SamplingParams(max_tokens=12, temperature=1.5, seed=5, stop=())
        first = engine.sample(source, ids[:3], 4, params)
        again = engine.sample(source, ids[:3], 4, params)
        other = engine.sample(source, ids[:3], 4, replace(params, seed=6))
        assert first == again
        assert first != other
        assert len(first.sequences) == 4
        assert len({tuple(s.tokens) for s in first.sequences}) > 1


def test_num_samples_decoded_in_one_batch_with_one_prefill(trained) -> None:
    engine, base_model, ids = trained
    calls: list[tuple[int, ...]] = []

    def hook(module, args):
        calls.append(tuple(args[0].shape))  # the token ids entering the model

    model = engine.models.get(base_model).model
    assert isinstance(model, PreTrainedModel)
    handle = model.get_input_embeddings().register_forward_pre_hook(hook)
    try:
        params = SamplingParams(max_tokens=6, temperature=1.0, seed=0, stop=())
        out = engine.sample(RUN, ids[:5], 8, params)
    finally:
        handle.remove()
    assert len(out.sequences) == 8 and all(len(s.tokens) == 6 for s in out.sequences)
    # One prefill of the prompt, then one packed forward per step for all 8 samples.
    assert calls == [(1, 5)] + [(1, 8)] * 5


def test_sampled_logprobs_match_the_learner(trained) -> None:
    engine, _, ids = trained
    for params in (
        SamplingParams(max_tokens=10, temperature=1.0, seed=1, stop=()),
        SamplingParams(max_tokens=10, temperature=1.0, seed=2, top_k=3, top_p=0.9, stop=()),
    ):
        prompt = ids[:4]
        out = engine.sample(RUN, prompt, 3, params)
        for seq in out.sequences:
            full = prompt + seq.tokens
            expected = engine.compute_logprobs(RUN, full)[len(prompt) :]
            assert seq.logprobs == pytest.approx(expected, abs=logprob_atol(engine))
            fwd = engine.forward("r", [sequence_datum(full)]).loss_fn_outputs[0]["logprobs"]
            assert seq.logprobs == pytest.approx(fwd[len(prompt) - 1 :], abs=logprob_atol(engine))


def test_temperature_scales_the_reported_logprobs(trained) -> None:
    engine, _base_model, ids = trained
    prompt = ids[:4]
    seq = engine.sample(RUN, prompt, 1, SamplingParams(max_tokens=6, temperature=0.7, seed=3))
    seq = seq.sequences[0]
    full = torch.tensor([prompt + seq.tokens], device=engine.device)
    with torch.no_grad():
        logits = peft_reference(engine, "r")(input_ids=full).logits[0].float()
    lp = torch.log_softmax(logits / 0.7, -1)[len(prompt) - 1 : -1]
    expected = lp.gather(1, full[0, len(prompt) :, None]).squeeze(1).tolist()
    assert seq.logprobs == pytest.approx(expected[: len(seq.tokens)], abs=logprob_atol(engine))


def test_top_k_1_and_tiny_top_p_are_greedy(trained) -> None:
    engine, base_model, ids = trained
    for source in (RUN, SampleSource(base_model=base_model)):
        want = engine.sample(source, ids[:2], 2, greedy(8, stop=())).sequences[0]
        for params in (
            SamplingParams(max_tokens=8, temperature=1.0, top_k=1, seed=9, stop=()),
            SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=9, stop=()),
        ):
            got = engine.sample(source, ids[:2], 2, params).sequences
            assert [s.tokens for s in got] == [want.tokens, want.tokens]
            assert got[0].logprobs == pytest.approx(want.logprobs, abs=logprob_atol(engine))


def test_prompt_logprobs(trained) -> None:
    engine, base_model, ids = trained
    for source in (RUN, SampleSource(base_model=base_model)):
        out = engine.sample(source, ids[:6], 2, greedy(3), prompt_logprobs=True)
        expected = engine.compute_logprobs(source, ids[:6])
        assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
        assert expected[0] is None and len(expected) == 6
        assert out.prompt_logprobs[1:] == pytest.approx(expected[1:], abs=logprob_atol(engine))
    assert engine.sample(RUN, ids[:6], 1, greedy(2)).prompt_logprobs is None


def test_sample_from_saved_checkpoints(trained, make_engine) -> None:
    engine, base_model, ids = trained
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=4, stop=())
    from_run = engine.sample(RUN, ids[:2], 2, params)
    sampler_ckpt = engine.save_weights_for_sampler("r", "for-sampling")
    state_ckpt = engine.save_state("r", "full-state")
    for path in (sampler_ckpt.path, f"eztinker://{state_ckpt.path}", sampler_ckpt.path):
        assert engine.sample(SampleSource(checkpoint=path), ids[:2], 2, params) == from_run

    # A fresh engine (another worker) with a one-entry LRU, alternating two checkpoints.
    other = Engine(
        EngineConfig(
            data_dir=engine.config.data_dir,
            checkpoints_dir=engine.config.checkpoints_dir,
            device=engine.device,
            dtype=engine.config.dtype,
            max_sampler_adapters=1,
        )
    )
    base_out = other.sample(SampleSource(base_model=base_model), ids[:2], 2, params)
    for path in (sampler_ckpt.path, state_ckpt.path, sampler_ckpt.path):
        got = other.sample(SampleSource(checkpoint=path), ids[:2], 2, params)
        assert [s.tokens for s in got.sequences] == [s.tokens for s in from_run.sequences]
        assert len(other._samplers) == 1  # the LRU keeps max_sampler_adapters
    assert other.sample(SampleSource(base_model=base_model), ids[:2], 2, params) == base_out
    engine.delete_checkpoint(sampler_ckpt.path)
    with pytest.raises(CheckpointNotFound):
        engine.sample(SampleSource(checkpoint=sampler_ckpt.path), ids[:2], 1, params)


def test_base_sampling_ignores_adapters(trained, make_engine) -> None:
    engine, base_model, ids = trained
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=4, stop=())
    fresh = make_engine()
    want = fresh.sample(SampleSource(base_model=base_model), ids[:3], 2, params)
    assert engine.sample(SampleSource(base_model=base_model), ids[:3], 2, params) == want
    assert engine.compute_logprobs(SampleSource(base_model=base_model), ids) == pytest.approx(
        fresh.compute_logprobs(SampleSource(base_model=base_model), ids), abs=1e-6
    )


@pytest.mark.parametrize(
    ("prompt", "num_samples", "params", "match"),
    [
        ([1] * 1000, 1, SamplingParams(max_tokens=25), "context"),
        ([], 1, SamplingParams(), "empty"),
        ([1, 2048], 1, SamplingParams(), "vocabulary"),
        ([1, -1], 1, SamplingParams(), "vocabulary"),
        ([1, 2], 0, SamplingParams(), "num_samples"),
        ([1, 2], 1, SamplingParams(max_tokens=0), "max_tokens"),
        ([1, 2], 1, SamplingParams(temperature=-1.0), "temperature"),
        ([1, 2], 1, SamplingParams(temperature=float("nan")), "temperature"),
        ([1, 2], 1, SamplingParams(top_p=0.0), "top_p"),
        ([1, 2], 1, SamplingParams(top_k=0), "top_k"),
        ([1, 2], 1, SamplingParams(stop=(5000,)), "stop"),
        ([1, 2], 1, SamplingParams(stop=("",)), "stop"),
    ],
)
def test_sample_rejects_bad_requests(trained, prompt, num_samples, params, match) -> None:
    engine, _, _ = trained
    with pytest.raises(InvalidRequest, match=match):
        engine.sample(RUN, prompt, num_samples, params)


def test_sample_source_errors(trained) -> None:
    engine, base_model, ids = trained
    params = greedy(2)
    with pytest.raises(InvalidRequest, match="exactly one"):
        engine.sample(SampleSource(), ids[:2], 1, params)
    with pytest.raises(InvalidRequest, match="exactly one"):
        engine.sample(SampleSource(base_model=base_model, run_id="r"), ids[:2], 1, params)
    with pytest.raises(UnknownRun):
        engine.sample(SampleSource(run_id="nope"), ids[:2], 1, params)
    with pytest.raises(CheckpointNotFound):
        engine.sample(SampleSource(checkpoint="r/never-saved"), ids[:2], 1, params)
    with pytest.raises(InvalidRequest):
        engine.sample(SampleSource(checkpoint="../../etc"), ids[:2], 1, params)
    with pytest.raises(InvalidRequest, match="context"):
        engine.compute_logprobs(RUN, [1] * 1025)


def test_sampling_deadline(make_engine) -> None:
    engine = make_engine(sample_timeout_s=0.0)
    with pytest.raises(OperationTimeout):
        engine.sample(SampleSource(base_model="tiny-gpt2"), [1, 2], 1, greedy(5))


def test_top_k_and_top_p_filters() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.2, 0.2]]))
    keep = lambda k, p: torch.isfinite(_filter(logits, k, p))[0].tolist()  # noqa: E731
    assert keep(-1, 1.0) == [True, True, True, True]
    assert keep(1, 1.0) == [False, True, False, False]
    assert keep(3, 1.0) == [False, True, True, True]
    assert keep(-1, 0.5) == [False, True, False, False]
    assert keep(-1, 0.6) == [False, True, True, False]  # ties: the lower token id ranks first
    assert keep(-1, 0.95) == [True, True, True, True]
    assert keep(2, 0.95) == [False, True, True, False]
    tied = torch.zeros(1, 5)
    assert torch.isfinite(_filter(tied, 1, 1.0))[0].tolist() == [True] + [False] * 4
