"""Service overhead of two (or more) versions of the code, measured side by side.

Exports each git ref (``WORKTREE`` = the working tree as it is) into a temporary directory,
starts each one's whole stack (``eztinker server --no-flower``: its own embedded broker, web and
worker), then times the same round trip as ``bench/service.py`` (POST a small ``forward``,
long-poll its future) against each in turn, in rounds of 20, interleaved with the op on an
in-process engine. A shared machine's slow phases then hit every version alike.

    uv run python bench/compare.py 85c1f8c WORKTREE [--samples 400] [--device cpu]
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service import free_port, http_roundtrip, in_process_op, pct, wait_healthy

from eztinker_tasks.lifeline import die_with_parent

REPO = Path(__file__).resolve().parent.parent


def export(ref: str, into: Path) -> Path:
    """The tree of ``ref`` (or the working tree) as a directory the server can run from."""
    into.mkdir(parents=True)
    if ref == "WORKTREE":
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        with tarfile.open(fileobj=(buf := io.BytesIO()), mode="w") as tar:
            for name in files:
                if (REPO / name).is_file():
                    tar.add(REPO / name, arcname=name)
    else:
        archive = subprocess.run(["git", "archive", ref], cwd=REPO, capture_output=True, check=True)
        buf = io.BytesIO(archive.stdout)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("refs", nargs="+", help="git refs; WORKTREE for the working tree")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="eztinker-compare-"))
    os.environ["OMP_NUM_THREADS"] = "1"
    local_op = in_process_op(tmp / "engine", args.device)
    servers: list[subprocess.Popen[bytes]] = []
    bases: list[str] = []
    for i, ref in enumerate(args.refs):
        tree = export(ref, tmp / f"tree{i}")
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "EZTINKER_REDIS_URL"} | {
            "EZTINKER_DATA_DIR": str(tmp / f"data{i}"),
            "CHECKPOINTS_DIR": str(tmp / f"ckpt{i}"),
            "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]),
        }
        log = open(tmp / f"server{i}.log", "wb")  # noqa: SIM115
        argv = [sys.executable, "-m", "eztinker", "server", "--no-flower", "--port", str(port),
                "--host", "127.0.0.1", "--device", args.device]  # fmt: skip
        servers.append(
            subprocess.Popen(
                argv,
                env=env,
                cwd=tree,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),  # a killed comparison leaves no server behind
            )
        )
        bases.append(f"http://127.0.0.1:{port}")
    try:
        for base in bases:
            wait_healthy(base, 180, f"{tmp}/server*.log")
        from eztinker import ServiceClient
        from eztinker.transport import Transport

        def roundtrip(base: str) -> Callable[[], None]:
            transport = Transport(base)
            run = ServiceClient(base_url=base).create_lora_training_client("tiny-gpt2", rank=8)
            return lambda: http_roundtrip(transport, run.run_id)

        calls = [local_op, *(roundtrip(base) for base in bases)]
        times: list[list[float]] = [[] for _ in calls]
        for _ in range(20):
            for call in calls:
                call()
        for _ in range(0, args.samples, 20):
            for call, out in zip(calls, times, strict=True):
                for _ in range(20):
                    t0 = time.perf_counter()
                    call()
                    out.append(time.perf_counter() - t0)
    finally:
        for server in servers:
            server.send_signal(signal.SIGINT)
        for server in servers:
            server.wait(60)

    local = pct(times[0], 0.5) * 1000
    print(f"\nengine in-process p50: {local:.2f} ms ({args.device})")
    print(f"{'version':<24}{'round trip p50':>16}{'p99':>10}{'overhead p50':>15}")
    for ref, out in zip(args.refs, times[1:], strict=True):
        p50, p99 = pct(out, 0.5) * 1000, pct(out, 0.99) * 1000
        print(f"{ref:<24}{p50:>16.2f}{p99:>10.2f}{p50 - local:>15.2f}")


if __name__ == "__main__":
    main()
