"""``examples/rl_loop.py`` against the real service: the mean reward rises, reproducibly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, Service

STEP = re.compile(
    r"^step +(\d+) reward ([0-9.]+) loss ([-+0-9.]+) kl (\S+) \|lp-q\| (\S+) clip (\S+)$",
    re.MULTILINE,
)


def run_rl_loop(service: Service, cwd: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "rl_loop.py"), "--base-url", service.base_url,
         *args],
        env=service.env, cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("loss", ["ppo", "importance_sampling"])
def test_rl_loop_reward_rises(service: Service, tmp_path: Path, loss: str) -> None:
    out = run_rl_loop(service, tmp_path, "--steps", "20", "--loss", loss, "--seed", "0")
    steps = STEP.findall(out)
    assert [int(s[0]) for s in steps] == list(range(1, 21)), out
    rewards = [float(s[1]) for s in steps]
    first, last = rewards[0], sum(rewards[-3:]) / 3
    assert 0.1 < first < 0.4, out  # signal from the start
    assert last >= first + 0.2 and last >= 1.5 * first, out
    kl, diff, clip = ([s[i].split("/") for s in steps] for i in (3, 4, 5))  # per minibatch
    # Minibatch 1 trains on the weights that sampled it: sampler/learner parity, no clipping.
    assert all(float(x[0]) < 1e-9 for x in kl) and all(float(x[0]) < 1e-5 for x in diff), out
    # Minibatch 2 trains one update later: off-policy, and with ppo the clip range is hit.
    assert max(float(x[1]) for x in diff) > 1e-2, out
    if loss == "ppo":
        assert all(x[0] == "0.000" for x in clip) and max(float(x[1]) for x in clip) > 0, out
    else:
        assert all(x == ["-", "-"] for x in clip), out  # importance_sampling does not clip

    # Seeded everything: the same command prints the same log (but for the run id), up to
    # float32 rounding: samples decode in batches whose make-up depends on timing, which
    # moves logprobs by ~1e-7 (the same tokens; the noise-level first KL, ~1e-14, shows it).
    if loss == "ppo":
        again = run_rl_loop(service, tmp_path, "--steps", "3", "--loss", loss, "--seed", "0")
        for got, first_time in zip(STEP.findall(again), steps[:3], strict=True):
            assert got[:2] == first_time[:2], (got, first_time)  # step, reward: same tokens
            # Printed to 4 decimals / 2 significant digits: allow one unit of the last digit;
            # the noise-level values (parity: ~1e-14 KL, ~1e-7 |lp-q|) within 1e-5.
            assert float(got[2]) == pytest.approx(float(first_time[2]), abs=1.5e-4)
            for a, b in zip(numbers(got[3:]), numbers(first_time[3:]), strict=True):
                assert a == pytest.approx(b, rel=0.02, abs=1e-5), (got, first_time)


def numbers(fields: tuple[str, ...]) -> list[float]:
    """The values of "a/b" log fields ("-" for none: 0)."""
    return [0.0 if x == "-" else float(x) for field in fields for x in field.split("/")]
