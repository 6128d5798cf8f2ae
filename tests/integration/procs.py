"""Helpers for tests that start whole stacks as a user would and look at their processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from eztinker_tasks.lifeline import die_with_parent


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "?"


def children(parent: int) -> set[int]:
    return {pid for pid, ppid in _parents().items() if ppid == parent}


def descendants(root: int) -> set[int]:
    """Every process below ``root`` (children, grandchildren, ...)."""
    parents = _parents()
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def describe(pids: set[int]) -> str:
    return "\n".join(f"{pid}: {cmdline(pid)[:160]}" for pid in sorted(pids))


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    """Wait until none of ``pids`` runs; those still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = {pid for pid in pids if alive(pid)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def end(pids: set[int]) -> None:
    """Clean-up after a failed test: SIGKILL what is left of ``pids``."""
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def stack_env(tmp: Path, model_cache: Path, **extra: str) -> dict[str, str]:
    """The environment of a private stack: its own data dir (tiny models linked in)."""
    data_dir = tmp / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for part in ("models", "tokenizers"):
        if (model_cache / part).exists() and not (data_dir / part).exists():
            (data_dir / part).symlink_to(model_cache / part)
    env = {k: v for k, v in os.environ.items() if k != "EZTINKER_REDIS_URL"}
    return env | {
        "EZTINKER_DATA_DIR": str(data_dir),
        "CHECKPOINTS_DIR": str(tmp / "checkpoints"),
        "EZTINKER_WORKER_HEARTBEAT_S": "0.5",
        "EZTINKER_WORKER_TTL_S": "4",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


@dataclass
class Server:
    """An ``eztinker server`` started in a session of its own, as from a terminal."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path
    data_dir: Path
    health: list[dict] = field(default_factory=list)  # every /health body seen while starting

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def broker_pid(self) -> int:
        return int(json.loads((self.data_dir / "broker" / "broker.json").read_text())["pid"])

    def wait_ready(self, timeout: float = 180.0) -> dict:
        """Wait for the terminal's "ready" line; check that /health agrees at every step.

        Before it is ready, /health says why (a worker is starting, not "start one"); once the
        terminal says ready, /health lists a live worker.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            said_ready = "ready in" in self.output()  # read before asking /health
            try:
                reply = httpx.get(self.base + "/health", timeout=5)
            except httpx.HTTPError:
                assert not said_ready, "said ready while the web did not answer"
                time.sleep(0.2)
                continue
            body = reply.json()
            self.health.append(body)
            if said_ready:
                assert reply.status_code == 200 and body["workers"], body
                return body
            if reply.status_code == 503 and body.get("broker", {}).get("ok"):
                assert body["status"] == "starting", body
                assert [w["name"] for w in body["starting"]], body
                assert "start one with" not in body["message"], body
                assert " is starting" in body["message"] or " are starting" in body["message"], body
            time.sleep(0.2)
        raise AssertionError(f"not ready in {timeout} s:\n{self.output()}")

    def kill(self) -> set[int]:
        """Clean-up after a failed test: SIGKILL the server and what it started; their pids."""
        pids = descendants(self.process.pid)
        with contextlib.suppress(OSError, ValueError, KeyError):
            pids.add(self.broker_pid())
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        end(pids)
        return pids

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        """Send ``sig`` to its process group (SIGINT: Ctrl-C in its terminal); its exit status."""
        os.killpg(self.process.pid, sig)
        return self.process.wait(timeout)


def start_server(env: dict[str, str], tmp: Path, port: int, *args: str) -> Server:
    log = tmp / f"server-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "eztinker", "server", "--no-flower", "--port", str(port),
             "--host", "127.0.0.1", "--device", "cpu", *args],
            env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent(),
        )  # fmt: skip
    return Server(process, port, log, Path(env["EZTINKER_DATA_DIR"]))
