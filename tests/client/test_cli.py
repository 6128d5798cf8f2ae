"""Every client command of the ``eztinker`` CLI against the real service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from eztinker.cli import app
from tests.conftest import REPO, Service

runner = CliRunner()


def cli(service: Service, *args: str):
    return runner.invoke(app, ["--base-url", service.base_url, *args], env={"COLUMNS": "80"})


def ok_json(service: Service, *args: str):
    result = cli(service, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_commands_end_to_end(service: Service, tmp_path: Path) -> None:
    # create (text and JSON)
    created = cli(service, "create", "--model", "tiny-gpt2", "--rank", "4")
    assert created.exit_code == 0, created.output
    assert created.stdout.startswith("created run run_")
    run_id = created.stdout.split()[2]
    info = ok_json(service, "create", "--model", "tiny-gpt2", "--rank", "4")
    other = info["run_id"]
    assert info["status"] == "ready" and info["lora"]["rank"] == 4

    # list / show
    listed = cli(service, "list")
    assert listed.exit_code == 0 and run_id in listed.stdout and other in listed.stdout
    assert run_id in {r["run_id"] for r in ok_json(service, "list")["runs"]}
    shown = cli(service, "show", run_id)
    assert shown.exit_code == 0 and run_id in shown.stdout and "tiny-gpt2" in shown.stdout
    assert ok_json(service, "show", run_id)["step"] == 0

    # sample: base model, live run, checkpoint
    sampled = cli(service, "sample", "Once upon a time,", "--max-tokens", "5", "--temperature", "0")
    assert sampled.exit_code == 0 and sampled.stdout.startswith("Once upon a time,")
    live = ok_json(
        service, "sample", "Once upon a time,", "--run", run_id, "--max-tokens", "5",
        "--temperature", "0", "-n", "2",
    )  # fmt: skip
    assert len(live["sequences"]) == 2 and len(live["sequences"][0]["tokens"]) <= 5

    # save (state and sampler), load, checkpoints
    saved = cli(service, "save", run_id, "cli-state")
    assert saved.exit_code == 0 and f"saved {run_id}/cli-state (state, step 0)" in saved.stdout
    sampler = ok_json(service, "save", run_id, "cli-sampler", "--sampler")
    assert sampler["kind"] == "sampler" and sampler["path"] == f"{run_id}/cli-sampler"
    from_ckpt = ok_json(
        service, "sample", "Hello", "--checkpoint", sampler["path"], "--max-tokens", "3",
        "--temperature", "0",
    )  # fmt: skip
    assert from_ckpt["sequences"][0]["stop_reason"] in ("stop", "length")
    loaded = cli(service, "load", other, f"{run_id}/cli-state")
    assert loaded.exit_code == 0 and f"loaded {run_id}/cli-state into {other}" in loaded.stdout
    table = cli(service, "checkpoints", run_id)
    assert f"{run_id}/cli-state" in table.stdout and f"{run_id}/cli-sampler" in table.stdout
    everything = ok_json(service, "checkpoints")["checkpoints"]
    assert {f"{run_id}/cli-state", f"{run_id}/cli-sampler"} <= {c["path"] for c in everything}

    # --no-wait, then wait
    future_id = cli(service, "save", run_id, "cli-later", "--no-wait").stdout.strip()
    assert future_id.startswith("fut_")
    assert ok_json(service, "wait", future_id)["path"] == f"{run_id}/cli-later"

    # download
    down = cli(service, "download", run_id, "cli-state", "-o", str(tmp_path))
    assert down.exit_code == 0, down.output
    files = [p for p in (tmp_path / "cli-state").rglob("*") if p.is_file()]
    assert files and f"to {tmp_path / 'cli-state'}" in down.stdout
    again = ok_json(service, "download", run_id, "cli-state", "-o", str(tmp_path), "--force")
    assert again["path"] == str(tmp_path / "cli-state") and again["files"]

    # status
    status = cli(service, "status")
    assert status.exit_code == 0 and "broker" in status.stdout and "cpu0" in status.stdout
    assert f"run.{run_id}" in status.stdout  # its queue, whole
    health = ok_json(service, "status")
    assert health["status"] == "ok" and health["workers"]

    # models
    assert "tiny-gpt2" in cli(service, "models").stdout

    # delete, then the run is gone
    deleted = cli(service, "delete", other)
    assert deleted.exit_code == 0 and f"deleted run {other}" in deleted.stdout
    gone = cli(service, "show", other)
    assert gone.exit_code == 1 and gone.stderr.strip() == f"error: unknown run '{other}'"
    assert ok_json(service, "delete", run_id)["deleted"] is True


def test_cli_user_errors_are_one_line(service: Service) -> None:
    too_long = cli(service, "sample", "Hi", "--max-tokens", "100000")
    assert too_long.exit_code == 1
    lines = too_long.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: max_tokens 100000 is over the limit")
    assert "Traceback" not in too_long.output
    as_json = cli(service, "sample", "Hi", "--max-tokens", "100000", "--json")
    assert as_json.exit_code == 1
    error = json.loads(as_json.stdout)["error"]
    assert error["category"] == "user" and error["status"] == 400
    bad_rank = cli(service, "create", "--rank", "0")
    assert bad_rank.exit_code == 1
    assert bad_rank.stderr.strip().splitlines() == [
        "error: invalid request: rank: Must be greater than or equal to 1 and less than or "
        "equal to 1024."
    ]


def test_cli_as_a_subprocess(service: Service) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "eztinker", "status", "--json"],
        env=service.env, capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["broker"]["ok"] is True
    missing = subprocess.run(
        [sys.executable, "-m", "eztinker", "show", "run_nope"],
        env=service.env, capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: unknown run 'run_nope'" and missing.stdout == ""
