"""The engine's progress callback: phases, token counts, throttling; never in the way."""

from __future__ import annotations

import itertools
import time

import pytest
from engine_helpers import sequence_datum

from eztinker_tasks.engine import Engine, progress
from eztinker_tasks.engine.progress import Ticker
from eztinker_tasks.types import LoraSpec, OpProgress, SampleSource, SamplingParams


class Recorder:
    """A progress callback that records each report with the time it came."""

    def __init__(self) -> None:
        self.reports: list[tuple[float, OpProgress]] = []

    def __call__(self, state: OpProgress) -> None:
        self.reports.append((time.monotonic(), state))

    @property
    def states(self) -> list[OpProgress]:
        return [s for _, s in self.reports]


@pytest.fixture
def interval(monkeypatch: pytest.MonkeyPatch) -> float:
    """A short report interval, so that a short sample (fast on any CPU) reports many ticks."""
    monkeypatch.setattr(progress, "REPORT_INTERVAL_S", 0.02)
    return 0.02


def test_sampling_reports_prefill_then_decode_tokens_throttled(
    engine: Engine, interval: float
) -> None:
    engine.create_run("r", "tiny-gpt2", LoraSpec(rank=4, seed=0))
    seen = Recorder()
    params = SamplingParams(max_tokens=60, temperature=1.0, stop=(), seed=0)
    began = time.monotonic()
    out = engine.sample(SampleSource(run_id="r"), [5, 17, 42], 3, params, progress=seen)
    took = time.monotonic() - began
    assert all(len(s.tokens) == 60 for s in out.sequences)  # stop=(): runs to max_tokens

    states = seen.states
    assert states[0] == OpProgress("prefill", tokens_total=3, sequences=3)
    assert states[1] == OpProgress("decode", tokens_done=0, tokens_total=60, sequences=3)
    ticks = states[2:]
    assert len(ticks) >= 2, f"{len(ticks)} decode reports in {took:.2f} s"
    done = [s.tokens_done or 0 for s in ticks]
    assert done == sorted(done) and len(set(done)) == len(done), done  # strictly increasing
    assert all(s.phase == "decode" and s.tokens_total == 60 for s in ticks)
    assert all(0 < d < 60 for d in done)
    assert all(s.sequences_finished == 0 for s in ticks)  # stop=(): none stops early
    # Throttled: one report per interval at most (besides the two phase changes).
    times = [t for t, _ in seen.reports[1:]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= interval * 0.99, gaps
    assert len(ticks) <= took / interval + 1


def test_sampling_counts_the_sequences_that_stopped(engine: Engine, interval: float) -> None:
    engine.create_run("r", "tiny-gpt2", LoraSpec(rank=4, seed=0))
    # 19 stop tokens among 2,048 near-uniform ones at temperature 1: the samples stop at
    # different steps, some before max_tokens (seed 0 on the CPU: at 25, 27 and 79 of 80).
    stop = tuple(range(100, 2000, 100))
    for seed in range(6):
        seen = Recorder()
        params = SamplingParams(max_tokens=80, temperature=1.0, stop=stop, seed=seed)
        out = engine.sample(SampleSource(run_id="r"), [5, 17], 4, params, progress=seen)
        stopped_at = [len(s.tokens) for s in out.sequences if s.stop_reason == "stop"]
        if 0 < len(stopped_at) < 4:
            break
    assert 0 < len(stopped_at) < 4, stopped_at
    ticks = [s for s in seen.states if s.phase == "decode" and s.tokens_done]
    assert ticks
    for tick in ticks:  # each report counts exactly the samples stopped by then
        assert tick.tokens_done is not None
        assert tick.sequences_finished == sum(n <= tick.tokens_done for n in stopped_at), tick
    assert any(t.sequences_finished for t in ticks), (ticks, stopped_at)


def test_loss_pass_reports_forward_then_backward(engine: Engine) -> None:
    engine.create_run("r", "tiny-gpt2", LoraSpec(rank=4, seed=0))
    data = [sequence_datum([5, 17, 42, 99, 7, 300]), sequence_datum([8, 9, 10])]
    seen = Recorder()
    engine.forward_backward_many("r", [data], progress=seen)
    assert seen.states == [
        OpProgress("forward", tokens_total=7, sequences=2),
        OpProgress("backward", tokens_total=7, sequences=2),
    ]
    forward_only = Recorder()
    engine.forward_backward_many("r", [data, data[:1]], backward=False, progress=forward_only)
    assert forward_only.states == [OpProgress("forward", tokens_total=12, sequences=3)]


def test_a_failing_callback_never_fails_the_operation(engine: Engine) -> None:
    engine.create_run("r", "tiny-gpt2", LoraSpec(rank=4, seed=0))

    def broken(state: OpProgress) -> None:
        raise RuntimeError("progress sink is down")

    out = engine.forward_backward_many("r", [[sequence_datum([5, 17, 42])]], progress=broken)
    assert out[0].metrics["loss:sum"] > 0
    sampled = engine.sample(
        SampleSource(run_id="r"), [5], 1, SamplingParams(max_tokens=5, stop=()), progress=broken
    )
    assert len(sampled.sequences[0].tokens) == 5


@pytest.mark.parametrize("interval", [0.0, 60.0])
def test_ticker_reports_phases_always_and_ticks_per_interval(interval: float) -> None:
    seen = Recorder()
    ticker = Ticker(seen, interval_s=interval)
    ticker.tick(1)  # before any phase: nothing to report
    ticker.phase("decode", tokens_done=0, tokens_total=10, sequences=2)
    calls = []
    for step in range(1, 4):
        ticker.tick(step, lambda: calls.append(1) or 1)
    ticker.phase("forward", tokens_total=4)
    phases = [s.phase for s in seen.states]
    if interval == 0.0:
        assert phases == ["decode", "decode", "decode", "decode", "forward"]
        assert [s.tokens_done for s in seen.states[1:4]] == [1, 2, 3]
        assert len(calls) == 3 and seen.states[1].sequences_finished == 1
    else:  # nothing within the interval but the phase changes; `finished` never asked
        assert phases == ["decode", "forward"] and calls == []
    Ticker(None).phase("decode")  # no callback: a no-op
