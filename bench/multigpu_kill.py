"""Kill a rank of a 2-GPU worker (NCCL) mid-operation: how long until the operation fails?

    python bench/multigpu_kill.py      # needs 2 GPUs

Rank 0 runs here exactly as a multi-GPU worker's rank 0 does (``ranks.start_followers``,
``lockstep.init``, ``LeadEngine``, the rank ``Watchdog``); rank 1 is the real follower process.
A run on ``shaped:llama-3.1-8b`` trains (8 x 1024 tokens per pass) in a loop; 0.3 s into one
pass rank 1 gets SIGKILL. Prints the seconds from the kill to the operation's error, the error,
and how fast the next operation is refused. (The CPU/gloo equivalent under the real stack is
``tests/integration/test_multigpu_worker.py``.)
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
DATA = Path(tempfile.mkdtemp())
os.environ["EZTINKER_DATA_DIR"] = str(DATA)
os.environ["CHECKPOINTS_DIR"] = str(DATA / "checkpoints")

import torch  # noqa: E402

from config import Settings  # noqa: E402
from eztinker_tasks import catalog  # noqa: E402
from eztinker_tasks.engine import Engine, lockstep  # noqa: E402
from eztinker_tasks.engine.distributed import LeadEngine, WorkerBroken  # noqa: E402
from eztinker_tasks.ranks import (  # noqa: E402
    COLLECTIVE_TIMEOUT_S,
    RankPlan,
    Watchdog,
    engine_config,
    start_followers,
)
from eztinker_tasks.types import AdamParams, Datum, LoraSpec  # noqa: E402


def main() -> None:
    catalog.ensure_tokenizer("tiny-llama", DATA)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    plan = RankPlan(2, ["cuda:0", "cuda:1"], f"tcp://127.0.0.1:{port}")
    start_followers(plan, "kill")
    group = lockstep.init(0, 2, torch.device("cuda:0"), plan.init, COLLECTIVE_TIMEOUT_S)
    lead = LeadEngine(Engine(engine_config(Settings.from_env(), "cuda:0")), group)
    Watchdog(plan.followers, lead.mark_broken).start()
    lead.create_run("r", "shaped:llama-3.1-8b", LoraSpec(rank=32, seed=1))
    g = torch.Generator().manual_seed(0)
    data = [
        Datum(tuple(ids[:-1]), {"target_tokens": ids[1:]})
        for ids in (torch.randint(3, 2000, (1025,), generator=g).tolist() for _ in range(16))
    ]
    lead.forward_backward("r", data)  # warm
    print("one pass ok; killing rank 1 0.3 s into the next", flush=True)
    killed = {}

    def kill() -> None:
        time.sleep(0.3)
        killed["at"] = time.monotonic()
        os.kill(plan.followers[0].pid, signal.SIGKILL)

    threading.Thread(target=kill).start()
    error = None
    try:
        for _ in range(1000):
            lead.forward_backward("r", data)
    except WorkerBroken as exc:
        error = exc
    failed_after = time.monotonic() - killed["at"]
    t0 = time.monotonic()
    try:
        lead.optim_step("r", AdamParams())
        refused = None
    except WorkerBroken as exc:
        refused = exc
    next_s = time.monotonic() - t0
    print(f"operation failed {failed_after:.2f} s after the kill: {error}", flush=True)
    print(f"next operation refused in {next_s * 1000:.2f} ms: {refused is not None}", flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
