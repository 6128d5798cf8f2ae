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
    for _, _, _, kl, diff, clip in steps:
        # Minibatch 1 trains on the weights that sampled it: sampler/learner parity.
        assert float(kl.split("/")[0]) < 1e-9 and float(diff.split("/")[0]) < 1e-5, out
        assert float(clip.split("/")[0]) == 0.0, out
    if loss == "ppo":  # minibatch 2 is one update off-policy: the clip range is hit
        assert max(float(s[5].split("/")[1]) for s in steps) > 0, out

    # Seeded everything: the same command prints the same log (but for the run id).
    if loss == "ppo":
        again = run_rl_loop(service, tmp_path, "--steps", "3", "--loss", loss, "--seed", "0")
        assert STEP.findall(again) == steps[:3]
