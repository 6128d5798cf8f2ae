"""The examples and the README's curl quick start run as written against the real service.

The loss goes down, and what the model says changes: ``sl_loop`` answers the same prompts
before and after training, and after training they are the completions it was trained on.
"""

from __future__ import annotations

import ast
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


SAMPLE = re.compile(
    r"^sample \d+: (.+)\n  base model: (.*)\n  trained:    (.*)\n  target:     (.*)$", re.MULTILINE
)


def test_sl_loop_trains_saves_resumes_and_samples(service: Service, tmp_path: Path) -> None:
    script = str(REPO / "examples" / "sl_loop.py")
    out = run_example(service, tmp_path, script, "--steps", "30", "--save-every", "15")
    curve = losses(out)
    assert len(curve) == 30, out
    assert sum(curve[-5:]) / 5 < 0.5 * sum(curve[:5]) / 5, curve
    assert "saved state run_" in out and "step  loss per completion token" in out
    table = re.findall(r"^ +(\d+) +([0-9.]+) (█+)$", out, re.MULTILINE)
    assert table[0][0] == "1" and table[-1][0] == "30" and len(table) >= 5, out
    assert len(table[0][2]) > len(table[-1][2])  # the bars shrink with the loss

    # What the model says to the training prompts changed, to what it was trained on.
    samples = [tuple(ast.literal_eval(v) for v in m) for m in SAMPLE.findall(out)]
    assert len(samples) == 4, out
    for prompt, before, after, _ in samples:
        assert after.strip(), f"{prompt!r}: empty sample after training"
        assert after != before, f"{prompt!r}: training changed nothing ({after!r})"
    learnt = [after.strip() == target.strip() for _, _, after, target in samples]
    assert sum(learnt) >= 3, samples
    assert re.search(rf"^{sum(learnt)} of 4 samples now match", out, re.MULTILINE)
    assert (tmp_path / "sl_loop_state.json").is_file()

    # Restarted with more steps, it resumes from its last state instead of starting over.
    more = run_example(service, tmp_path, script, "--steps", "35", "--save-every", "15")
    assert re.search(r"resumed from run_\w+/sl-step-00030 at step 30", more), more
    steps = [int(m.group(1)) for m in LOSS.finditer(more)]
    assert steps == [31, 32, 33, 34, 35]
    assert losses(more)[0] < curve[0] * 0.5


def readme_block(heading: str, language: str = "bash") -> str:
    """The first fenced block under ``heading`` in README.md, exactly as written there."""
    readme = (REPO / "README.md").read_text()
    section = readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"^```{language}\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert match, f"no bash block under {heading!r}"
    return match.group(1)


def test_readme_curl_quick_start_pastes_and_trains(service: Service, tmp_path: Path) -> None:
    block = readme_block("Quick start (curl)")
    assert "EZTINKER_BASE_URL" in block  # the only thing the test sets: where the server is
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block],
        env=service.env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    run_id = re.fullmatch(r"run (run_\w+)", lines[0])
    assert run_id, lines
    curve = [
        float(m.group(1)) for m in re.finditer(r"^step \d+: loss ([0-9.]+)$", proc.stdout, re.M)
    ]
    assert len(curve) == 10 and curve[-1] < 0.7 * curve[0], curve
    # The trained run samples the sentence it was trained on, and the save lands.
    assert lines[-2] == " ran slowly past the old mill.", lines
    assert lines[-1] == f"{run_id.group(1)}/checkpoint_v1"
    assert (service.checkpoints_dir / run_id.group(1) / "checkpoint_v1").is_dir()


def test_readme_python_quick_start_runs_as_written(service: Service, tmp_path: Path) -> None:
    block = readme_block("Quick start (Python)", "python")
    proc = subprocess.run(
        [sys.executable, "-c", block],
        env=service.env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    curve = [float(line.split()[1]) for line in lines[:-1]]
    assert len(curve) == 20 and curve[-1] < 0.6 * curve[0], lines
    assert lines[-1] == "The quick brown fox jumps over the lazy dog.", lines


def test_seed_quickstart_runs_as_written(service: Service, tmp_path: Path) -> None:
    script = str(REPO / "examples" / "seed_quickstart.py")
    out = run_example(service, tmp_path, script, "--steps", "5")
    curve = losses(out)
    assert len(curve) == 5 and curve[-1] < curve[0], out
    assert "sample: Once upon a time," in out
    assert re.search(r"saved run_\w+/checkpoint_v1 \(step 5,", out), out
