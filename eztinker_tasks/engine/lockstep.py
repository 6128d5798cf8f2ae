"""The ranks of one multi-GPU worker, and the few collectives that keep them in lockstep.

A multi-GPU worker is K processes (ranks) joined by ``torch.distributed``: NCCL on GPUs, gloo on
the CPU. Every rank runs the same engine operation with the same arguments (rank 0 receives them
from Celery and sends them on, ``engine.distributed``), so each rank takes every decision the
others take. Where a decision could differ between ranks (a sampled token, the free memory, a
wall-clock deadline), rank 0's value is sent to all (``agree`` / ``minimum``).

``Group`` is the process's membership; ``active()`` is that group only on the thread that runs
an engine operation (``running``): a collective from another thread (the heartbeat asking for
memory figures) would pair with the wrong call on the other ranks, so there every helper here is
local.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """This process's place in a multi-GPU worker: ``rank`` of ``world`` on ``device``."""

    rank: int
    world: int
    device: torch.device

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"


_local = threading.local()
_group: Group | None = None


def init(rank: int, world: int, device: torch.device, init_method: str, timeout_s: float) -> Group:
    """Join the worker's process group (blocks until all ``world`` ranks have joined)."""
    global _group
    from datetime import timedelta

    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = Group(rank, world, device)
    dist.init_process_group(
        group.backend,
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    _group = group
    return group


def group() -> Group | None:
    """This process's group (None: a one-device worker)."""
    return _group


def active() -> Group | None:
    """The group, on the thread running an engine operation in lockstep; else None."""
    return _group if getattr(_local, "running", False) else None


@contextmanager
def running() -> Generator[None, None, None]:
    """Mark this thread as the one running engine operations in lockstep."""
    before = getattr(_local, "running", False)
    _local.running = _group is not None
    try:
        yield
    finally:
        _local.running = before


def agree(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as rank 0 has it, on every rank (in place; a no-op outside lockstep)."""
    g = active()
    if g is None:
        return tensor
    moved = tensor.to(g.device)
    dist.broadcast(moved, src=0)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def agree_flags(flags: Sequence[bool]) -> list[bool]:
    """Rank 0's booleans, on every rank (a no-op outside lockstep)."""
    if active() is None or not flags:
        return list(flags)
    return [bool(x) for x in agree(torch.tensor(list(flags), dtype=torch.bool)).tolist()]


def minimum(value: int | None) -> int | None:
    """The smallest of the ranks' ``value`` (None if any rank has None; local outside lockstep)."""
    g = active()
    if g is None:
        return value
    t = torch.tensor([-1 if value is None else int(value)], dtype=torch.int64, device=g.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    out = int(t.item())
    return None if out < 0 else out


def sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum ``tensors`` over the ranks, in place (one flattened all-reduce)."""
    g = active()
    if g is None or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def split(sizes: Sequence[int], world: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) index ranges of ``sizes``, one per rank, balanced by their sum.

    Every item goes to exactly one rank, in order; a rank may get none.
    """
    total = sum(sizes)
    bounds = [0]
    acc = 0
    i = 0
    for r in range(1, world):
        target = total * r / world
        while i < len(sizes) and acc + sizes[i] / 2 <= target:
            acc += sizes[i]
            i += 1
        bounds.append(i)
    bounds.append(len(sizes))
    return [(bounds[r], bounds[r + 1]) for r in range(world)]
