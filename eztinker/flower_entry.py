"""``python -m eztinker.flower_entry --broker URL flower ...``: Flower that stops at once.

Flower's own SIGTERM handler calls ``sys.exit``, and Python then joins Flower's executor
threads, one of which may be waiting (up to ``--inspect_timeout``) on a worker that is itself
shutting down and will never answer. Under honcho every process gets SIGTERM at once, so Flower
outlived the broker and logged "Inspect method ... failed: Connection refused" on every Ctrl-C,
or was SIGKILLed after honcho's 5 s. Flower keeps no state that needs flushing (no
``--persistent``), so on SIGTERM / SIGINT it logs one line and exits the process at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys


def _exit_now(signum: int, _frame: object) -> None:
    logging.getLogger("flower.command").info("%s detected, shutting down", signum)
    logging.shutdown()
    os._exit(0)


def main() -> None:
    import flower.command
    from celery.__main__ import main as celery_main

    # flower.command installs ``sigterm_handler`` by name when the command starts.
    setattr(flower.command, "sigterm_handler", _exit_now)  # noqa: B010 (a function by another name)
    signal.signal(signal.SIGINT, _exit_now)
    sys.argv[0] = "celery"
    celery_main()


if __name__ == "__main__":
    main()
