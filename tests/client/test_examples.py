"""Both examples run to completion against the real service, with the loss going down."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, Service

LOSS = re.compile(r"^step (\d+)(?:/\d+)?:? loss ([0-9.]+)", re.MULTILINE)


def run_example(service: Service, cwd: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args, "--base-url", service.base_url],
        env=service.env, cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def losses(output: str) -> list[float]:
    return [float(m.group(2)) for m in LOSS.finditer(output)]


def test_sl_loop_trains_saves_resumes_and_samples(service: Service, tmp_path: Path) -> None:
    script = str(REPO / "examples" / "sl_loop.py")
    out = run_example(service, tmp_path, script, "--steps", "20", "--save-every", "10")
    curve = losses(out)
    assert len(curve) == 20, out
    assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:5]) / 5, curve
    assert "saved state run_" in out and out.count("sample: ") == 3
    assert (tmp_path / "sl_loop_state.json").is_file()

    # Restarted with more steps, it resumes from its last state instead of starting over.
    more = run_example(service, tmp_path, script, "--steps", "25", "--save-every", "10")
    assert re.search(r"resumed from run_\w+/sl-step-00020 at step 20", more), more
    steps = [int(m.group(1)) for m in LOSS.finditer(more)]
    assert steps == [21, 22, 23, 24, 25]
    assert losses(more)[0] < curve[0] * 0.8


def test_seed_quickstart_runs_as_written(service: Service, tmp_path: Path) -> None:
    script = str(REPO / "examples" / "seed_quickstart.py")
    out = run_example(service, tmp_path, script, "--steps", "5")
    curve = losses(out)
    assert len(curve) == 5 and curve[-1] < curve[0], out
    assert "sample: Once upon a time," in out
    assert re.search(r"saved run_\w+/checkpoint_v1 \(step 5,", out), out
