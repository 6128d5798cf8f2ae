"""Top-k logprobs and streamed decode steps (what the OpenAI-compatible route needs).

Top-k logprobs are checked against a plain PyTorch reference (the PEFT model's logits over
prompt + sampled tokens); streamed steps against the final output; a sink answering "gone"
ends the request early with ``RequestCancelled``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import (
    DEVICE,
    logprob_atol,
    new_engine,
    new_run,
    peft_reference,
    sequence_datum,
    train,
)

from eztinker_tasks.engine.sample_batches import generate_one, prepare
from eztinker_tasks.errors import InvalidRequest, RequestCancelled
from eztinker_tasks.types import SampleCall, SampleSource, SamplingParams, TokenStep

RUN = SampleSource(run_id="r")


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def trained(request, data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    engine = new_engine(data_dir, tmp_path_factory.mktemp("ckpt"))
    new_run(engine, "r", request.param, rank=8)
    train(engine, "r", [sequence_datum(list(range(5, 25)))], steps=3, lr=1e-3)
    return engine, request.param


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_top_logprobs_match_a_torch_reference(trained, temperature: float) -> None:
    engine, _ = trained
    prompt = [5, 6, 7, 8]
    params = SamplingParams(max_tokens=6, temperature=temperature, seed=4, stop=(), top_logprobs=5)
    out = engine.sample(RUN, prompt, 2, params)
    full_rows = [prompt + seq.tokens for seq in out.sequences]
    with torch.no_grad():
        logits = peft_reference(engine, "r")(
            input_ids=torch.tensor(full_rows, device=engine.device)
        )
    logits = logits.logits.float()[:, len(prompt) - 1 : -1]
    scaled = logits if temperature == 0 else logits / temperature
    want_values, want_ids = torch.log_softmax(scaled, -1).topk(5, dim=-1)
    atol = logprob_atol(engine)
    for row, seq in enumerate(out.sequences):
        assert seq.top_logprobs is not None and len(seq.top_logprobs) == len(seq.tokens) == 6
        for k, top in enumerate(seq.top_logprobs):
            assert len(top) == 5
            assert [lp for _, lp in top] == pytest.approx(want_values[row, k].tolist(), abs=atol)
            # ids agree wherever the reference's neighbours are not (numerically) tied
            ref_v, ref_i = want_values[row, k].tolist(), want_ids[row, k].tolist()
            for j, (token, _) in enumerate(top):
                near = [i for i, v in zip(ref_i, ref_v, strict=True) if abs(v - ref_v[j]) <= atol]
                assert token in near
            # the sampled token's own logprob is from the same distribution
            assert seq.logprobs[k] <= top[0][1] + atol
    assert "top_logprobs" in out.sequences[0].to_dict()


def test_no_top_logprobs_unless_asked(trained) -> None:
    engine, _ = trained
    out = engine.sample(RUN, [5, 6], 1, SamplingParams(max_tokens=3, seed=1, stop=()))
    assert out.sequences[0].top_logprobs is None
    assert "top_logprobs" not in out.sequences[0].to_dict()
    with pytest.raises(InvalidRequest, match="top_logprobs"):
        engine.sample(RUN, [5, 6], 1, SamplingParams(max_tokens=3, top_logprobs=21))


def _collect(steps: list[TokenStep], cancel_after: int | None = None):
    def sink(step: TokenStep) -> bool:
        steps.append(step)
        return cancel_after is not None and len(steps) >= cancel_after

    return sink


def test_streamed_steps_equal_the_output(trained) -> None:
    engine, _ = trained
    steps: list[TokenStep] = []
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=3, top_logprobs=2, stop=(9, 10))
    call = SampleCall(RUN, [5, 6, 7], 3, params, sink=_collect(steps))
    [out] = engine.sample_many([call])
    assert not isinstance(out, Exception)
    alone = engine.sample(RUN, [5, 6, 7], 3, params)
    assert out == alone  # streaming changes nothing in the result
    assert [s.index for s in steps] == list(range(len(steps)))
    for row, seq in enumerate(out.sequences):
        streamed = [s.tokens[row] for s in steps if s.tokens[row] is not None]
        assert streamed == seq.tokens
        lps = [s.logprobs[row] for s in steps if s.logprobs[row] is not None]
        assert lps == pytest.approx(seq.logprobs)
        tops = [
            s.top_logprobs[row] or [] for s in steps if s.top_logprobs and s.tokens[row] is not None
        ]
        assert [[t for t, _ in top] for top in tops] == [
            [t for t, _ in p] for p in seq.top_logprobs
        ]


def test_a_gone_consumer_ends_the_request_early(trained) -> None:
    engine, _ = trained
    steps: list[TokenStep] = []
    params = SamplingParams(max_tokens=200, temperature=1.0, seed=3, stop=())
    gone = SampleCall(RUN, [5, 6, 7], 2, params, sink=_collect(steps, cancel_after=3))
    other = SampleCall(RUN, [5, 6], 1, SamplingParams(max_tokens=20, seed=1, stop=()))
    first, second = engine.sample_many([gone, other])
    assert isinstance(first, RequestCancelled)
    assert len(steps) == 3  # no step after the consumer left
    assert not isinstance(second, Exception) and len(second.sequences[0].tokens) == 20


def test_the_fallback_sampler_streams_and_cancels(trained) -> None:
    """``sampler.generate`` (models ``engine.decode`` does not run) streams the same way."""
    engine, _ = trained
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=2, stop=(), top_logprobs=3)
    steps: list[TokenStep] = []
    base, request = prepare(
        engine._source, SampleCall(RUN, [5, 6], 2, params, sink=_collect(steps))
    )
    out = generate_one(base, request, engine.config)
    if torch.device(DEVICE).type == "cpu":
        # Bit-identical on the CPU. On a GPU the two loops' kernels differ in the last bits
        # (reduction order, TF32), which can flip a sampled token: there only the stream is
        # compared with the loop's own output.
        assert out == engine.sample(RUN, [5, 6], 2, params)
    assert [s.tokens[0] for s in steps] == out.sequences[0].tokens
    steps.clear()
    base, request = prepare(
        engine._source, SampleCall(RUN, [5, 6], 2, params, sink=_collect(steps, cancel_after=2))
    )
    with pytest.raises(RequestCancelled):
        generate_one(base, request, engine.config)
    assert len(steps) == 2
