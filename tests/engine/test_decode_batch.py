"""Many sample requests in one decode batch (``Engine.sample_many``): runs, checkpoints and the
bare base together, each request getting exactly what it gets alone; errors stay per request;
the KV budget splits a batch and refuses a request too large alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from engine_helpers import (
    SENTENCE,
    encode,
    logprob_atol,
    new_engine,
    new_run,
    sequence_datum,
    train,
)
from transformers import PreTrainedModel

from eztinker_tasks.engine import decode as decoding
from eztinker_tasks.engine import sample_batches
from eztinker_tasks.engine.decode_steps import Live
from eztinker_tasks.errors import EZTinkerError, InvalidRequest, UnknownRun
from eztinker_tasks.types import SampleCall, SampleOutput, SampleSource, SamplingParams


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def setup(request, data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two runs trained apart (ranks 8 and 16), a saved checkpoint of a third state of run a."""
    base_model = request.param
    engine = new_engine(data_dir, tmp_path_factory.mktemp("ckpt"))
    ids = encode(engine, base_model, SENTENCE)
    new_run(engine, "a", base_model, rank=8)
    new_run(engine, "b", base_model, rank=16)
    train(engine, "a", [sequence_datum(ids)], steps=6, lr=3e-3)
    checkpoint = engine.save_weights_for_sampler("a", "mid").path
    train(engine, "a", [sequence_datum(ids)], steps=6, lr=3e-3)
    train(engine, "b", [sequence_datum(ids[::-1])], steps=10, lr=3e-3)
    return engine, base_model, ids, checkpoint


def mixed_calls(base_model: str, ids: list[int], checkpoint: str) -> list[SampleCall]:
    run_a, run_b = SampleSource(run_id="a"), SampleSource(run_id="b")
    ckpt, base = SampleSource(checkpoint=checkpoint), SampleSource(base_model=base_model)
    hot = SamplingParams(max_tokens=9, temperature=1.3, seed=11, stop=())
    warm = SamplingParams(max_tokens=7, temperature=0.8, top_k=5, seed=4)
    nucleus = SamplingParams(max_tokens=5, top_p=0.7, seed=9, stop=())
    until_dog = SamplingParams(max_tokens=6, temperature=0.0, stop=(" dog",))
    return [
        SampleCall(run_b, ids[:3], 3, hot),
        SampleCall(base, ids[:5], 2, SamplingParams(max_tokens=4, temperature=1.0, seed=2)),
        SampleCall(run_a, ids[:1], 1, SamplingParams(max_tokens=12, temperature=0.0, stop=())),
        SampleCall(ckpt, ids[:2], 4, warm),
        SampleCall(run_a, ids[:6], 2, nucleus, prompt_logprobs=True),
        SampleCall(run_b, ids[:4], 1, until_dog),
    ]


def assert_same(got: object, alone: object, atol: float) -> None:
    """Both are ``SampleOutput``s with the same tokens, logprobs within ``atol``."""
    assert isinstance(got, SampleOutput) and isinstance(alone, SampleOutput)
    assert len(got.sequences) == len(alone.sequences)
    for g, a in zip(got.sequences, alone.sequences, strict=True):
        assert g.tokens == a.tokens and g.stop_reason == a.stop_reason
        assert g.logprobs == pytest.approx(a.logprobs, abs=atol)
    if alone.prompt_logprobs is None:
        assert got.prompt_logprobs is None
    else:
        assert got.prompt_logprobs is not None
        assert got.prompt_logprobs[0] is None and alone.prompt_logprobs[0] is None
        assert got.prompt_logprobs[1:] == pytest.approx(alone.prompt_logprobs[1:], abs=atol)


def assert_all_same(got: Sequence[object], alone: Sequence[object], atol: float) -> None:
    """``assert_same`` for each pair (as many on each side)."""
    for one, other in zip(got, alone, strict=True):
        assert_same(one, other, atol)


def test_a_mixed_batch_gives_each_request_what_it_gets_alone(setup) -> None:
    engine, base_model, ids, checkpoint = setup
    calls = mixed_calls(base_model, ids, checkpoint)
    alone = [engine.sample_many([call])[0] for call in calls]
    assert all(isinstance(out, SampleOutput) for out in alone)
    # The sources really differ: the two runs and the base do not all say the same.
    greedy = SamplingParams(max_tokens=8, temperature=0.0, stop=())
    texts = {
        tuple(engine.sample(src, ids[:2], 1, greedy).sequences[0].tokens)
        for src in (
            SampleSource(run_id="a"),
            SampleSource(run_id="b"),
            SampleSource(base_model=base_model),
        )
    }
    assert len(texts) == 3
    together = engine.sample_many(calls)
    atol = logprob_atol(engine)
    assert_all_same(together, alone, atol)
    # The same batch in another order: still the same per request.
    backwards = engine.sample_many(calls[::-1])[::-1]
    assert_all_same(backwards, alone, atol)


def test_the_batch_runs_as_one_prefill_and_one_forward_per_step(setup) -> None:
    engine, base_model, ids, checkpoint = setup
    calls = mixed_calls(base_model, ids, checkpoint)
    forwards: list[tuple[int, ...]] = []
    model = engine.models.get(base_model).model
    assert isinstance(model, PreTrainedModel)
    handle = model.get_input_embeddings().register_forward_pre_hook(
        lambda _m, args: forwards.append(tuple(args[0].shape))
    )
    try:
        outs = engine.sample_many(calls)
    finally:
        handle.remove()
    longest = max(
        max(len(s.tokens) for s in out.sequences) for out in outs if isinstance(out, SampleOutput)
    )
    prompts = sum(len(c.prompt_tokens) for c in calls)
    assert forwards[0] == (1, prompts)  # every prompt once, packed, whatever num_samples
    assert len(forwards) == longest  # then one forward per sampled position
    rows = sum(c.num_samples for c in calls)
    assert forwards[1] == (1, rows)  # every row of every request in that forward


def test_sampled_logprobs_in_a_batch_match_the_learner(setup) -> None:
    engine, base_model, ids, checkpoint = setup
    calls = mixed_calls(base_model, ids, checkpoint)
    outs = engine.sample_many(calls)
    for call, out in zip(calls, outs, strict=True):
        if call.params.temperature != 1.0 or call.params.top_k or call.params.top_p < 1.0:
            continue  # the reported logprob is of the temperature-scaled distribution
        assert isinstance(out, SampleOutput)
        prompt = list(call.prompt_tokens)
        for seq in out.sequences:
            expected = engine.compute_logprobs(call.source, prompt + seq.tokens)[len(prompt) :]
            assert seq.logprobs == pytest.approx(expected, abs=logprob_atol(engine))


def test_a_bad_request_fails_alone(setup) -> None:
    engine, base_model, ids, checkpoint = setup
    calls = mixed_calls(base_model, ids, checkpoint)
    info = engine.model_info(base_model)
    bad = [
        SampleCall(SampleSource(run_id="nobody"), ids[:2], 1, SamplingParams(max_tokens=3)),
        SampleCall(SampleSource(run_id="a"), [info.vocab_size], 1, SamplingParams(max_tokens=3)),
        SampleCall(
            SampleSource(run_id="a"), ids[:2], 1, SamplingParams(max_tokens=info.max_context)
        ),
    ]
    outs = engine.sample_many([bad[0], *calls[:2], bad[1], calls[2], bad[2]])
    assert isinstance(outs[0], UnknownRun)
    assert isinstance(outs[3], InvalidRequest) and isinstance(outs[5], InvalidRequest)
    alone = [engine.sample_many([c])[0] for c in calls[:3]]
    assert_all_same([outs[1], outs[2], outs[4]], alone, logprob_atol(engine))


def test_the_kv_budget_splits_a_batch_and_refuses_a_request_too_large_alone(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, base_model, ids, checkpoint = setup
    calls = mixed_calls(base_model, ids, checkpoint)
    alone = [engine.sample_many([call])[0] for call in calls]
    model = engine.models.get(base_model).model
    per_token = decoding.kv_bytes_per_token(model)
    # Free memory for about 40 cached positions: no two of these requests fit together.
    free = int(40 * per_token / decoding.KV_HEADROOM)
    huge = SampleCall(SampleSource(run_id="a"), ids[:2], 8, SamplingParams(max_tokens=30))
    monkeypatch.setattr(sample_batches, "free_bytes", lambda device: free)
    batches: list[int] = []
    real = decoding.decode

    def counting(model, context, requests, **kwargs):
        batches.append(len(requests))
        return real(model, context, requests, **kwargs)

    monkeypatch.setattr(decoding, "decode", counting)
    outs = engine.sample_many([*calls, huge])
    refused = outs[-1]
    assert isinstance(refused, InvalidRequest) and refused.category == "user"
    assert "KV cache" in refused.message and "fewer" in refused.message
    assert len(batches) > 1 and sum(batches) == len(calls)
    assert_all_same(outs[:-1], alone, logprob_atol(engine))


def test_errors_in_results_are_eztinker_errors(setup) -> None:
    engine, _, ids, _ = setup
    [out] = engine.sample_many(
        [SampleCall(SampleSource(), ids[:2], 1, SamplingParams(max_tokens=2))]
    )
    assert isinstance(out, EZTinkerError) and out.category == "user"


def test_decode_equals_the_transformers_cache_sampler(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Models engine.decode does not run keep the transformers-cache sampler: both give the
    # same samples (an independent check of the decode loop, and of the fallback).
    engine, base_model, ids, checkpoint = setup
    calls = mixed_calls(base_model, ids, checkpoint)
    ours = [engine.sample_many([call])[0] for call in calls]
    monkeypatch.setattr(decoding, "SUPPORTED_MODEL_TYPES", frozenset())
    assert not decoding.supports(engine.models.get(base_model).model)
    theirs = engine.sample_many(calls)
    assert_all_same(ours, theirs, logprob_atol(engine))


# --------------------------------------------------------------------------- joining


def long_call(ids: list[int], max_tokens: int = 300) -> SampleCall:
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=21, stop=())
    return SampleCall(SampleSource(run_id="a"), ids[:2], 2, params)


def joining(calls: list[SampleCall], after_polls: int = 2):
    """A ``poll`` that hands over ``calls`` at its ``after_polls``-th call, then nothing."""
    polls = []

    def poll() -> list[SampleCall]:
        polls.append(len(polls))
        return calls if len(polls) == after_polls else []

    return poll, polls


def test_requests_joining_a_running_batch_get_what_they_get_alone(setup) -> None:
    engine, base_model, ids, checkpoint = setup
    lead = long_call(ids)
    calls = mixed_calls(base_model, ids, checkpoint)
    alone = [engine.sample_many([call])[0] for call in [lead, *calls]]
    poll, polls = joining(calls)
    order: list[int] = []
    outs = engine.sample_many([lead], poll=poll, on_done=lambda i, outcome: order.append(i))
    assert len(polls) >= 2 and len(outs) == 1 + len(calls)
    # They joined the running batch: every short one ended before the long one.
    assert order[-1] == 0 and sorted(order) == list(range(len(outs))), order
    assert_all_same(outs, alone, logprob_atol(engine))


def test_a_joining_request_that_cannot_join_still_gets_its_answer(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, base_model, ids, checkpoint = setup
    other_base = "tiny-llama" if base_model == "tiny-gpt2" else "tiny-gpt2"
    good = mixed_calls(base_model, ids, checkpoint)[1]
    elsewhere = SampleCall(
        SampleSource(base_model=other_base), [3, 4], 2, SamplingParams(max_tokens=5, seed=1)
    )
    unknown = SampleCall(SampleSource(run_id="nobody"), [3], 1, SamplingParams(max_tokens=2))
    alone = [engine.sample_many([c])[0] for c in (long_call(ids, 200), good, elsewhere)]
    poll, _ = joining([good, elsewhere, unknown])
    order: list[int] = []
    outs = engine.sample_many(
        [long_call(ids, 200)], poll=poll, on_done=lambda i, outcome: order.append(i)
    )
    assert isinstance(outs[3], UnknownRun)
    assert_all_same(outs[:3], alone, logprob_atol(engine))
    assert order.index(2) > order.index(0)  # another base: after the batch, on its own

    # No memory to grow the cache (4 more rows of the batch's 202 positions) for a request
    # that fits alone (4 rows of 9): it runs after the batch, still right.
    wide = replace(good, num_samples=4)
    [wide_alone] = engine.sample_many([wide])
    model = engine.models.get(base_model).model
    free = int(410 * decoding.kv_bytes_per_token(model) / decoding.KV_HEADROOM)
    monkeypatch.setattr(sample_batches, "free_bytes", lambda device: free)
    poll, _ = joining([wide])
    order.clear()
    outs = engine.sample_many(
        [long_call(ids, 200)], poll=poll, on_done=lambda i, outcome: order.append(i)
    )
    assert order == [0, 1]
    assert_same(outs[1], wide_alone, logprob_atol(engine))


def test_a_request_past_its_timeout_fails_alone(setup, data_dir: Path, tmp_path: Path) -> None:
    _, base_model, ids, _ = setup
    engine = new_engine(data_dir, tmp_path, sample_timeout_s=0.5)
    short = SampleCall(
        SampleSource(base_model=base_model), ids[:3], 1, SamplingParams(max_tokens=4, seed=0)
    )
    never = SampleCall(
        SampleSource(base_model=base_model),
        ids[:2],
        2,
        SamplingParams(max_tokens=1000, stop=(), seed=0),
    )
    # Time-bound: a CPU much faster than today's could finish 1,000 tokens in 0.5 s; the
    # request is sized so that it cannot (about 3 ms a step here).
    outs = engine.sample_many([never, short])
    assert isinstance(outs[0], EZTinkerError) and outs[0].code == "timeout"
    assert isinstance(outs[1], SampleOutput)


def test_unseeded_samples_of_one_run_do_not_depend_on_their_batch(setup) -> None:
    # Two runs made alike (same seed): the one samples two unseeded requests in one batch,
    # the other one after the other. Each request draws its own generator's seed from the
    # run's generator when it starts, so both give the same samples.
    engine, base_model, ids, _ = setup
    params = SamplingParams(max_tokens=6, temperature=1.0, stop=())
    for run in ("same1", "same2"):
        new_run(engine, run, base_model, rank=4, seed=77)
    calls = [
        SampleCall(SampleSource(run_id="same1"), ids[:2], 2, params),
        SampleCall(SampleSource(run_id="same1"), ids[:3], 1, params),
    ]
    together = engine.sample_many(calls)
    apart = [
        engine.sample_many([replace(call, source=SampleSource(run_id="same2"))])[0]
        for call in calls
    ]
    assert_all_same(together, apart, logprob_atol(engine))
    for run in ("same1", "same2"):
        engine.delete_run(run)


def test_a_checkpoint_that_cannot_be_read_fails_only_its_request(setup) -> None:
    engine, base_model, ids, _ = setup
    saved = engine.save_weights_for_sampler("b", "to-break")
    weights = next(Path(engine.config.checkpoints_dir).glob(f"{saved.path}/*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated on disk
    good = mixed_calls(base_model, ids, saved.path)[1]
    broken = SampleCall(SampleSource(checkpoint=saved.path), ids[:2], 1, SamplingParams())
    [alone] = engine.sample_many([good])
    outs = engine.sample_many([good, broken])
    assert isinstance(outs[1], EZTinkerError) and outs[1].category == "server", outs[1]
    assert_same(outs[0], alone, logprob_atol(engine))
    poll, _ = joining([broken])
    outs = engine.sample_many([long_call(ids, 100)], poll=poll)
    assert isinstance(outs[0], SampleOutput) and isinstance(outs[1], EZTinkerError)


def test_a_joining_request_takes_the_rows_an_ended_one_gave_back(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, base_model, ids, _ = setup
    short = SampleCall(
        SampleSource(base_model=base_model), ids[:3], 1, SamplingParams(max_tokens=4, stop=())
    )
    model = engine.models.get(base_model).model
    # Room for the lead (2 rows x 202 positions) plus ONE more row of that length.
    free = int(3 * 202 * decoding.kv_bytes_per_token(model) / decoding.KV_HEADROOM)
    monkeypatch.setattr(sample_batches, "free_bytes", lambda device: free)
    polls: list[int] = []
    ended: list[int] = []
    second_sent: list[bool] = []

    def poll_twice() -> list[SampleCall]:
        polls.append(len(polls))
        if len(polls) == 2:
            return [short]
        if 1 in ended and not second_sent:
            second_sent.append(True)
            return [short]
        return []

    first_rows: list[int] = []
    place = Live.of.__func__

    def spy(cls, index, request, first_row, *args):
        first_rows.append(first_row)
        return place(cls, index, request, first_row, *args)

    monkeypatch.setattr(Live, "of", classmethod(spy))
    outs = engine.sample_many(
        [long_call(ids, 200)], poll=poll_twice, on_done=lambda i, outcome: ended.append(i)
    )
    assert second_sent and len(outs) == 3
    assert ended == [1, 2, 0], ended  # the second one did not wait for the long one
    assert first_rows == [0, 2, 2]  # and took the row the first one gave back
    assert all(isinstance(o, SampleOutput) for o in outs)
