"""The engine's settings (``EngineConfig``) and how "auto" device and dtype resolve."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    """Where the engine keeps its files and how it places models.

    ``data_dir`` holds the model cache (``data_dir/models``) and tokenizer directories
    (``data_dir/tokenizers``); ``checkpoints_dir`` holds ``<run_id>/<name>/`` checkpoints.
    """

    data_dir: Path
    checkpoints_dir: Path
    device: str = "auto"  # "auto" -> "cuda" if available else "cpu"; or "cpu", "cuda", "cuda:1"
    dtype: str = "auto"  # "auto" -> bfloat16 on CUDA, float32 on CPU; or a dtype name
    max_sampler_adapters: int = 4  # saved sampler checkpoints kept loaded (LRU)
    sample_timeout_s: float = 600.0  # wall-clock limit of one sample call
    logprob_chunk_elements: int = 1 << 27  # float32 elements per chunk of the logprob kernel
    # Recompute activations in the backward: "auto" (when a pass would not fit), "always", "never"
    activation_checkpointing: str = "auto"


def resolve_device(name: str) -> torch.device:
    """Turn ``"auto"``/``"cuda"``/``"cuda:1"``/``"cpu"`` into a concrete device with an index."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.device("cuda", index)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` is bfloat16 on CUDA and float32 elsewhere; otherwise the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(
            f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {name!r}"
        ) from None
