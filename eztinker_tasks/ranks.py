"""The processes of a multi-GPU worker: rank 0 (the Celery worker) and its followers.

``eztinker worker --gpus 0,1`` (or ``--ranks 2 --device cpu``) runs rank 0 in its own process
and starts one follower process per other rank (``python -m eztinker_tasks.ranks``), joined by
``torch.distributed`` over a local TCP rendezvous. A follower builds the same engine and runs
rank 0's commands (``engine.distributed.follow``); it talks to nobody else.

Failure: rank 0's ``Watchdog`` polls its followers; when one exits it marks the engine broken
(``LeadEngine.mark_broken``: collectives in flight are aborted, every operation then fails at
once with ``WorkerBroken``) and the worker stops advertising itself. A follower whose parent
(rank 0) is gone exits within a second (``_orphan_guard``); collectives never wait for the
backends' default timeouts (minutes).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from config import Settings
    from eztinker_tasks.engine import EngineConfig

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the watchdogs look at the other processes
COLLECTIVE_TIMEOUT_S = 1800.0  # a backstop only: the watchdogs act within a second


@dataclass
class RankPlan:
    """How this worker's ranks are laid out: ``world`` processes on ``devices`` (one each)."""

    world: int
    devices: list[str]  # per rank: "cuda:0", "cuda:1", ... or "cpu"
    init: str  # the rendezvous, tcp://127.0.0.1:<port>
    followers: list[subprocess.Popen[bytes]] = field(default_factory=list)


def plan(gpus: str | None, ranks: int | None, device: str | None) -> RankPlan | None:
    """The ranks ``--gpus``/``--ranks``/``--device`` ask for; None for a one-device worker.

    ``gpus``: comma-separated GPU ids ("0,1"): CUDA_VISIBLE_DEVICES is set to them and rank r
    uses cuda:r. ``ranks`` with ``device`` "cpu": that many CPU ranks (gloo; for tests).
    Raises ValueError for a contradictory or malformed request.
    """
    if gpus:
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"--gpus must be distinct GPU ids like 0,1; got {gpus!r}")
        if ranks is not None and ranks != len(ids):
            raise ValueError(f"--ranks {ranks} contradicts --gpus {gpus} ({len(ids)} GPUs)")
        if device not in (None, "cuda"):
            raise ValueError("--gpus runs on CUDA; leave --device out")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        world, devices = len(ids), [f"cuda:{r}" for r in range(len(ids))]
    elif ranks is not None and ranks > 1:
        if device != "cpu":
            raise ValueError("--ranks without --gpus needs --device cpu (use --gpus for GPUs)")
        world, devices = ranks, ["cpu"] * ranks
    else:
        return None
    if world < 2:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return RankPlan(world, devices, f"tcp://127.0.0.1:{port}")


def start_followers(rank_plan: RankPlan, name: str) -> None:
    """Start ranks 1..world-1 (each dies with this process)."""
    from eztinker_tasks.lifeline import die_with_parent

    for rank in range(1, rank_plan.world):
        argv = [
            sys.executable, "-m", "eztinker_tasks.ranks",
            "--rank", str(rank), "--world", str(rank_plan.world),
            "--device", rank_plan.devices[rank], "--init", rank_plan.init, "--name", name,
        ]  # fmt: skip
        rank_plan.followers.append(
            subprocess.Popen(argv, preexec_fn=die_with_parent(signal.SIGKILL))
        )


class Watchdog(threading.Thread):
    """Rank 0's watch over its followers: ``on_death(why)`` once, when the first one exits."""

    def __init__(
        self, followers: Sequence[subprocess.Popen[bytes]], on_death: Callable[[str], None]
    ) -> None:
        super().__init__(name="eztinker-rank-watchdog", daemon=True)
        self.followers = list(followers)
        self.on_death = on_death

    def run(self) -> None:
        while True:
            for rank, proc in enumerate(self.followers, start=1):
                code = proc.poll()
                if code is not None:
                    how = f"signal {-code}" if code < 0 else f"exit code {code}"
                    self.on_death(f"rank {rank} (pid {proc.pid}) died ({how})")
                    return
            time.sleep(POLL_S)


def _orphan_guard() -> None:
    """Exit this follower as soon as rank 0 (its parent) is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_S)
        os._exit(3)

    threading.Thread(target=watch, name="eztinker-orphan-guard", daemon=True).start()


def follower_main(argv: Sequence[str] | None = None) -> int:
    """One follower rank: join the group, build the engine, run rank 0's commands."""
    parser = argparse.ArgumentParser(prog="python -m eztinker_tasks.ranks")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--init", required=True)
    parser.add_argument("--name", default="worker")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format=f"[{args.name} rank {args.rank}] %(levelname)s %(message)s"
    )
    _orphan_guard()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from config import Settings
    from eztinker_tasks.engine import Engine, lockstep
    from eztinker_tasks.engine.commands import follow

    settings = Settings.from_env()
    group = lockstep.init(
        args.rank, args.world, torch.device(args.device), args.init, COLLECTIVE_TIMEOUT_S
    )
    engine = Engine(engine_config(settings, args.device))
    log.info("following rank 0 on %s", args.device)
    try:
        follow(engine, group)
    except Exception as exc:  # rank 0 is gone or broke the group: nothing left to serve
        log.error("leaving: %s", exc)
        os._exit(1)
    return 0


def engine_config(settings: Settings, device: str) -> EngineConfig:
    """The engine settings of every rank of a worker (as ``runtime`` builds rank 0's)."""
    from eztinker_tasks.engine import EngineConfig

    return EngineConfig(
        data_dir=settings.data_dir,
        checkpoints_dir=settings.checkpoints_dir,
        device=device,
        dtype=settings.dtype,
        activation_checkpointing=settings.activation_checkpointing,
    )


if __name__ == "__main__":
    raise SystemExit(follower_main())
