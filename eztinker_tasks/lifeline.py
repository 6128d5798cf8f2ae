"""Child processes that never outlive the process that started them.

``eztinker server`` (and ``eztinker broker``, and the test fixtures) start the broker, the web
server, the workers and Flower as child processes. A parent that is stopped normally stops its
children first; one that dies without a chance to do so (SIGKILL, a crash, the OOM killer) would
leave them running, holding ports, GPUs and the broker's data dir. ``die_with_parent()`` gives
``subprocess.Popen`` a ``preexec_fn`` that asks the kernel (``prctl(PR_SET_PDEATHSIG)``) to send
the child a signal the moment its parent dies, however it dies. The setting survives ``exec``.

Two limits, both of the kernel:

- Linux only. Elsewhere ``die_with_parent()`` returns ``None`` (no effect); what a SIGKILLed
  server leaves behind is then cleaned up by the next start (see ``EmbeddedBroker.start``).
- The "parent" is the *thread* that started the child: start children from a thread that lives
  as long as they should (the main thread), never from a short-lived helper thread.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - an unusual libc
        return None


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when this process dies.

    ``sig`` is what the child gets: SIGTERM lets it shut down cleanly (the broker flushes its
    append-only file, gunicorn answers its long-polls), SIGKILL ends it at once. Returns
    ``None`` where the kernel offers no such thing (not Linux); ``Popen`` accepts ``None``.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()
    signum = int(sig)

    def preexec() -> None:  # runs in the child, between fork and exec: keep it minimal
        prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody will signal us
            os._exit(1)

    return preexec
