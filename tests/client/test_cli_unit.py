"""CLI argument handling and output, against the scripted stub server (no EZTinker needed)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eztinker.archive import UnsafeArchiveError, safe_extract
from eztinker.cli import app
from tests.client.stub import Reply, StubServer
from tests.conftest import free_port

runner = CliRunner()
RUN = "run_" + "0123456789abcdef" * 2  # as long as a real run id
FUT = "fut_" + "fedcba9876543210" * 2


def invoke(stub_or_url: StubServer | str, *args: str):
    url = stub_or_url if isinstance(stub_or_url, str) else stub_or_url.url
    return runner.invoke(app, ["--base-url", url, *args], env={"COLUMNS": "80"})


def run_record(**kw: object) -> dict:
    return {
        "run_id": RUN, "base_model": "tiny-gpt2", "lora": {"rank": 8}, "worker": "cpu0@host",
        "status": "ready", "created_at": 1.7e9, "step": 3, "tokens_trained": 120,
        "last_loss": 2.5, "last_state": None, "error": None, "checkpoints": [], **kw,
    }  # fmt: skip


def test_help_lists_client_and_service_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = "server worker broker web flower create list show sample save load checkpoints"
    for name in [*commands.split(), "download", "delete", "status"]:
        assert name in result.output
    server_help = runner.invoke(app, ["server", "--help"]).output
    for option in ("--port", "--host", "--workers", "--no-flower", "--device"):
        assert option in server_help


def test_unreachable_server_is_one_clean_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = invoke(url, "list")
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the EZTinker server")
    assert "Traceback" not in result.output
    as_json = invoke(url, "status", "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["error"]["code"] == "connection_error"


def test_list_prints_whole_ids_in_a_narrow_terminal(stub: StubServer) -> None:
    stub.on("GET", "/v1/runs", Reply(200, {"runs": [run_record()]}))
    result = invoke(stub, "list")
    assert result.exit_code == 0, result.output
    assert RUN in result.stdout and "tiny-gpt2" in result.stdout and "2.5000" in result.stdout
    parsed = json.loads(invoke(stub, "list", "--json").stdout)
    assert parsed["runs"][0]["run_id"] == RUN and parsed["runs"][0]["step"] == 3


def test_show_and_a_404(stub: StubServer) -> None:
    ckpt = {"path": f"{RUN}/ck", "name": "ck", "kind": "state", "step": 3, "size_bytes": 2048,
            "created_at": 1.7e9, "run_id": RUN}  # fmt: skip
    stub.on("GET", f"/v1/runs/{RUN}", Reply(200, run_record(checkpoints=[ckpt])))
    result = invoke(stub, "show", RUN)  # (no metrics route: a server before the history)
    assert result.exit_code == 0 and RUN in result.stdout and f"{RUN}/ck" in result.stdout
    assert "tokens trained" in result.stdout and "120" in result.stdout
    assert "loss:sum by step" not in result.stdout
    points = [
        {"seq_id": 2 * i + 1, "op": "forward_backward", "step": i, "time": 1.7e9,
         "metrics": {"loss:sum": 10.0 / (i + 1)}}
        for i in range(6)
    ]  # fmt: skip
    stub.on("GET", f"/v1/runs/{RUN}/metrics", Reply(200, {"run_id": RUN, "points": points}))
    drawn = invoke(stub, "show", RUN)
    assert drawn.exit_code == 0 and "loss:sum by step" in drawn.stdout
    assert "10.0" in drawn.stdout and "1.7" in drawn.stdout  # the axis spans the losses
    err = {
        "code": "unknown_run",
        "status": 404,
        "category": "user",
        "message": "unknown run 'nope'",
    }
    stub.on("GET", "/v1/runs/nope", Reply(404, err))
    missing = invoke(stub, "show", "nope")
    assert missing.exit_code == 1
    assert missing.stderr.strip() == "error: unknown run 'nope'"


def test_a_tenant_at_its_run_limit_is_told_what_to_do(stub: StubServer) -> None:
    err = {
        "code": "too_many_runs",
        "status": 429,
        "category": "user",
        "message": "tenant 'a' holds 2 runs, its limit (EZTINKER_TENANT_MAX_RUNS=2); delete a run",
    }
    stub.on("POST", "/v1/runs", Reply(429, err, headers={"Retry-After": "30"}))
    result = invoke(stub, "create", "--model", "tiny-gpt2")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: {err['message']}",
        "hint: `eztinker list` shows your runs; `eztinker delete RUN` frees one",
    ]
    assert len(stub.hits("POST", "/v1/runs")) == 1  # not retried: waiting cannot help


def test_operations_wait_or_print_the_future(stub: StubServer) -> None:
    stub.on("POST", f"/v1/runs/{RUN}/save", Reply(202, {"future_id": FUT, "run_id": RUN}))
    result = invoke(stub, "save", RUN, "ck", "--sampler", "--no-wait")
    assert result.exit_code == 0 and result.stdout.strip() == FUT
    assert stub.hits("POST", f"/v1/runs/{RUN}/save")[0].json == {"name": "ck", "kind": "sampler"}
    done = {"future_id": FUT, "status": "succeeded",
            "result": {"path": f"{RUN}/ck", "step": 3, "kind": "sampler"}}  # fmt: skip
    stub.on("GET", f"/v1/futures/{FUT}", Reply(200, done))
    saved = invoke(stub, "save", RUN, "ck")
    assert saved.exit_code == 0 and f"saved {RUN}/ck (state, step 3)" in saved.stdout
    error = {"code": "invalid_request", "category": "user", "message": "bad name"}
    failed = {"future_id": FUT, "status": "failed", "error": error}
    stub.on("GET", f"/v1/futures/{FUT}", Reply(200, failed))
    bad = invoke(stub, "save", RUN, "ck", "--json")
    assert bad.exit_code == 1 and json.loads(bad.stdout)["error"]["category"] == "user"


def test_sample_arguments(stub: StubServer) -> None:
    both = invoke(stub, "sample", "hi", "--run", RUN, "--model", "tiny-gpt2")
    assert both.exit_code == 1 and "at most one of" in both.stderr
    stub.on("POST", "/v1/sample", Reply(202, {"future_id": FUT}))
    seq = {"tokens": [1], "logprobs": [-1.0], "text": " there", "stop_reason": "length"}
    out = {"sequences": [seq]}
    stub.on("GET", f"/v1/futures/{FUT}", Reply(200, {"status": "succeeded", "result": out}))
    result = invoke(stub, "sample", "hi", "--checkpoint", f"{RUN}/ck", "--max-tokens", "7",
                    "--temperature", "0")  # fmt: skip
    assert result.exit_code == 0 and result.stdout.strip() == "hi there"
    body = stub.hits("POST", "/v1/sample")[0].json
    assert body["checkpoint"] == f"{RUN}/ck" and body["max_tokens"] == 7
    assert body["temperature"] == 0.0 and body["prompt"] == "hi"
    bad = invoke(stub, "sample", "hi", "--max-tokens", "lots")
    assert bad.exit_code == 2  # a usage error, reported by click


def test_status_degraded_exits_nonzero(stub: StubServer) -> None:
    body = {"status": "degraded", "broker": {"ok": True, "latency_ms": 0.4}, "workers": [],
            "runs": 0, "message": "no live worker: start one with `eztinker worker`"}  # fmt: skip
    stub.on("GET", "/health", Reply(503, body))
    result = invoke(stub, "status")
    assert result.exit_code == 1 and "no live worker" in result.stdout
    assert len(stub.hits("GET", "/health")) == 1  # a 503 with a body is an answer: no retries


def _tar(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            link = tarfile.TarInfo(symlink)
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            tar.addfile(link)
    return buf.getvalue()


def test_download_extracts_and_refuses_path_traversal(stub: StubServer, tmp_path: Path) -> None:
    good = _tar({"ck/adapter.safetensors": b"weights", "ck/meta.json": b"{}"})
    stub.on("GET", f"/v1/runs/{RUN}/checkpoints/ck/archive",
            Reply(200, raw=good, content_type="application/gzip"))  # fmt: skip
    result = invoke(stub, "download", RUN, "ck", "-o", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"] == ["adapter.safetensors", "meta.json"]
    assert (tmp_path / "out" / "ck" / "adapter.safetensors").read_bytes() == b"weights"
    again = invoke(stub, "download", RUN, "ck", "-o", str(tmp_path / "out"))
    assert again.exit_code == 1 and "already exists" in again.stderr

    evil = _tar({"ck/ok": b"x", "ck/../../escaped": b"owned"})
    stub.on("GET", f"/v1/runs/{RUN}/checkpoints/ck/archive",
            Reply(200, raw=evil, content_type="application/gzip"))  # fmt: skip
    bad = invoke(stub, "download", RUN, "ck", "-o", str(tmp_path / "evil"))
    assert bad.exit_code == 1 and "refusing archive entry" in bad.stderr
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "evil" / "ck").exists()


@pytest.mark.parametrize(
    ("entries", "symlink"),
    [({"/abs/path": b"x"}, None), ({"a/../../b": b"x"}, None), ({"ck/ok": b"x"}, "ck/link")],
)
def test_safe_extract_rejects_unsafe_members(
    tmp_path: Path, entries: dict[str, bytes], symlink: str | None
) -> None:
    with pytest.raises(UnsafeArchiveError):
        safe_extract(io.BytesIO(_tar(entries, symlink)), tmp_path / "dest")
    assert not any((tmp_path / "dest").rglob("*"))


def test_sizes_are_in_binary_units_named_as_such() -> None:
    """Sizes are counted in powers of 1,024, so they say KiB/MiB/GiB (the console does too):
    2,044,288 bytes is 1.9 MiB, which as "MB" would read 2.0."""
    from eztinker.cli_common import fmt_size

    assert fmt_size(512) == "512 B"
    assert fmt_size(2_044_288) == "1.9 MiB"
    assert fmt_size(3 * 1024) == "3.0 KiB"
    assert fmt_size(5 * 1024**3) == "5.0 GiB"
    assert fmt_size(5 * 1024**4) == "5120.0 GiB"
