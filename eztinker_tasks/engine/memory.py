"""Memory planning of a training pass: when to recompute activations instead of keeping them.

``activation_bytes(base, tokens, checkpointed)`` estimates what a backward pass keeps for
``tokens`` packed tokens; ``needs_checkpointing`` switches activation checkpointing on when the
plain pass would not fit in the device's free memory, and ``check_fits`` refuses (a ``user``
error naming the limit) a pass that would not fit even then, instead of letting the CUDA
allocator kill the operation (or the worker) with an out-of-memory error.

The per-token figures are deliberately generous upper bounds for decoder-only transformers in
bf16 (hidden states, attention projections, MLP intermediates and their gradients' scratch),
not measurements: they only decide a switch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from eztinker_tasks.engine import lockstep
from eztinker_tasks.engine.models import LoadedBase
from eztinker_tasks.engine.runs import RunState
from eztinker_tasks.errors import InvalidRequest

MODES = ("auto", "always", "never")
HEADROOM = 0.85  # share of the free memory a pass may plan to use


def _dims(base: LoadedBase) -> tuple[int, int, int, int]:
    config = getattr(base.model, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 1024)
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 24)
    inter = int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 0)
    return hidden, layers, inter or 4 * hidden, base.info.vocab_size


def activation_bytes(base: LoadedBase, tokens: int, checkpointed: bool) -> int:
    """Upper estimate of the memory a backward pass over ``tokens`` tokens keeps (bytes)."""
    hidden, layers, inter, _ = _dims(base)
    size = torch.finfo(next(base.model.parameters()).dtype).bits // 8
    per_layer = (16 * hidden + 6 * inter) * size  # per token, all of one layer's activations
    if checkpointed:  # every layer's input, plus one layer recomputed at a time
        return tokens * (layers * hidden * size + per_layer)
    return tokens * layers * per_layer


def free_bytes(device: torch.device) -> int | None:
    """Free device memory (CUDA: the driver's free plus the allocator's cached); None on CPU.

    On a multi-GPU worker, in lockstep, the least of the ranks' (so all decide alike).
    """
    if device.type != "cuda":
        return lockstep.minimum(None)
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return lockstep.minimum(int(free + cached))


def needs_checkpointing(mode: str, base: LoadedBase, tokens: int) -> bool:
    """Whether a backward pass over ``tokens`` tokens should recompute its activations."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    free = free_bytes(base.device)
    if free is None:
        return False
    plain = activation_bytes(base, tokens, checkpointed=False)
    if plain <= HEADROOM * free:
        return False
    check_fits(base, tokens, free)
    return True


def check_fits(base: LoadedBase, tokens: int, free: int) -> None:
    """Raise a ``user`` error when even a checkpointed pass over ``tokens`` would not fit."""
    need = activation_bytes(base, tokens, checkpointed=True)
    if need > HEADROOM * free:
        per_token = activation_bytes(base, 1, checkpointed=True)
        limit = int(HEADROOM * free // max(1, per_token))
        raise InvalidRequest(
            f"a pass of {tokens} tokens needs about {need >> 20} MiB of activations even with "
            f"activation checkpointing; {free >> 20} MiB are free on {base.device}, enough for "
            f"about {limit} tokens: send fewer or shorter datums per call",
            errors={"data": [f"over the memory limit of about {limit} tokens per pass"]},
        )


def engine_stats(
    bases: Iterable[LoadedBase],
    runs: Mapping[str, RunState],
    sampler_adapters: int,
    device: torch.device,
) -> dict[str, int]:
    """An engine's memory in bytes: base params, per-run adapter and optimizer, CUDA."""
    stats = {
        "base_params_bytes": sum(b.param_bytes for b in bases),
        "num_runs": len(runs),
        "adapter_bytes": sum(r.adapter_bytes() for r in runs.values()),
        "optimizer_bytes": sum(r.optimizer_bytes() for r in runs.values()),
        "sampler_adapters": sampler_adapters,
    }
    for run_id, run in runs.items():
        stats[f"run.{run_id}.adapter_bytes"] = run.adapter_bytes()
        stats[f"run.{run_id}.optimizer_bytes"] = run.optimizer_bytes()
    if device.type == "cuda":
        stats["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
        stats["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        stats["cuda_reserved_bytes"] = torch.cuda.memory_reserved(device)
    return stats
