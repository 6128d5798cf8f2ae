"""The supervisor behind ``eztinker server``: start the processes, restart them, stop them.

- Every child runs in a process group of its own: a Ctrl-C in the terminal reaches only the
  supervisor, which stops the children in order (web, Flower and workers first, the broker
  last) instead of all of them racing the broker down at once.
- Every child dies with the supervisor if the supervisor is killed (``lifeline``): web and
  Flower get SIGTERM (gunicorn answers its long-polls), workers SIGKILL (their broker dies with
  the supervisor, so a worker could finish nothing; a running op would only hold its GPU).
- A child that exits is restarted; one that keeps failing (6 exits in a minute) stops the
  service, unless it is optional (Flower), which is then left stopped.
- The service is *ready* when ``/health`` lists one of its own workers as live; the terminal
  says so then, not when the processes are merely launched.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eztinker_tasks.lifeline import die_with_parent

RESTART_WINDOW_S = 60.0
MAX_RESTARTS = 5


def say(message: str) -> None:
    print(f"[eztinker] {message}", flush=True)


@dataclass
class Exits:
    """When a process exited lately: one that exits too often is not restarted again."""

    times: list[float] = field(default_factory=list)

    def failing(self, now: float) -> bool:
        """Record an exit at ``now``; True if it exited more than 5 times in the last minute."""
        self.times = [t for t in self.times if now - t < RESTART_WINDOW_S] + [now]
        return len(self.times) > MAX_RESTARTS


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    optional: bool = False  # Flower: when it keeps failing, the service runs on without it
    death_signal: int = signal.SIGTERM  # what it gets if the supervisor dies
    worker: str | None = None  # the Celery node name, for a worker
    device: str | None = None  # a worker's device
    process: subprocess.Popen[bytes] | None = None
    exits: Exits = field(default_factory=Exits)
    given_up: bool = False

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            process_group=0,
            preexec_fn=die_with_parent(self.death_signal),
        )
        say(f"started {self.name} (pid {self.process.pid})")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(sig)


def health(url: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """The body of ``GET url`` (200 or 503), or None while the web does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:  # 503: up, not ready
        try:
            return json.loads(exc.read())
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


class Supervisor:
    """Keeps ``children`` running until ``stop()``; see the module docstring.

    ``on_exit(child)`` is called when a child exited (before it is restarted).
    """

    def __init__(
        self, children: list[Child], on_exit: Callable[[Child], None] | None = None
    ) -> None:
        self.children = children
        self.on_exit = on_exit
        self.failed = False

    def check(self) -> bool:
        """Restart what exited; False once an essential child keeps failing."""
        now = time.time()
        for child in self.children:
            if child.process is None or child.given_up or child.alive():
                continue
            rc = child.process.returncode
            if self.on_exit is not None:
                self.on_exit(child)
            if child.exits.failing(now):
                if child.optional:
                    say(f"{child.name} keeps failing (rc {rc}); the service runs on without it")
                    child.given_up = True
                    continue
                say(f"{child.name} keeps failing (rc {rc}); stopping")
                self.failed = True
                return False
            say(f"{child.name} exited with {rc}; restarting")
            child.start()
        return True

    def stop(self, timeout_s: float, force: Callable[[], bool]) -> None:
        """SIGTERM every child, wait up to ``timeout_s``, then SIGKILL what is left.

        ``force()`` turning True (a second Ctrl-C) ends the wait at once.
        """
        for child in self.children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while any(c.alive() for c in self.children):
            if time.monotonic() > deadline or force():
                for child in self.children:
                    if child.alive():
                        say(f"{child.name} did not stop; killing it")
                        child.signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        for child in self.children:
            if child.process is not None:
                child.process.wait()


class StopRequests:
    """Counts Ctrl-C / SIGTERM: the first asks for a clean stop, another one for a quick one.

    One Ctrl-C can arrive twice (from the terminal, and forwarded by ``uv run``): only a
    signal half a second after the first counts as another one.
    """

    def __init__(self) -> None:
        self.count = 0
        self._first = 0.0

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.count == 0:
            self._first = now
        if self.count == 0 or now - self._first > 0.5:
            self.count += 1


class Startup:
    """Follows the service's workers until ``/health`` lists each of them as live.

    A worker that is launched but not live yet is re-announced as starting (``announce(child,
    True)``: /health then says "starting", not "no live worker"); a worker that exits is
    announced as no longer starting and followed again once it is restarted.
    """

    def __init__(
        self, url: str, workers: list[Child], announce: Callable[[Child, bool], None]
    ) -> None:
        self.url = url
        self.workers = workers
        self.announce = announce
        self.live: set[str] = set()
        self.ready = False
        self.started = time.monotonic()
        self._next_probe = 0.0

    def launched(self, child: Child) -> None:
        self.announce(child, True)

    def exited(self, child: Child) -> None:
        if child.worker is not None:
            self.live.discard(child.worker)
            self.announce(child, False)

    def poll(self) -> bool:
        """Probe ``/health`` when due; True once: when the service has just become ready.

        Ready: the web answers and lists one of *our* workers (by pid) as live; with no
        worker to wait for (``--workers 0``), as soon as the web answers.
        """
        pending = [c for c in self.workers if c.worker not in self.live and c.alive()]
        if (self.ready and not pending) or time.monotonic() < self._next_probe:
            return False
        self._next_probe = time.monotonic() + 0.5
        body = health(self.url + "/health")
        pids = {w.get("pid") for w in (body or {}).get("workers", [])}
        for child in pending:
            if child.pid in pids and child.worker is not None:
                self.live.add(child.worker)
                if self.ready:
                    say(f"{child.worker} is live")
            else:
                self.announce(child, True)
        if self.ready or body is None or (self.workers and not self.live):
            return False
        self.ready = True
        return True
