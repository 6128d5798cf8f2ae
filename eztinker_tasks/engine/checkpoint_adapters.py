"""Saved checkpoints loaded as extra adapters, for sampling from them: a small LRU.

Sampling ``checkpoint="<run_id>/<name>"`` needs that checkpoint's LoRA factors on the
multi-adapter layers of its base. ``CheckpointAdapters.get`` loads them once (an adapter of its
own, with no optimizer) and keeps the most recently used ``size`` of them; a checkpoint saved
again under the same name (a newer ``created_at``) is loaded again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from eztinker_tasks.engine import checkpoints
from eztinker_tasks.engine.models import LoadedBase, ModelRegistry
from eztinker_tasks.engine.multilora import Adapter
from eztinker_tasks.types import LoraSpec

NewAdapter = Callable[[LoadedBase, str, LoraSpec, int], Adapter]


@dataclass
class CheckpointAdapter:
    """A saved checkpoint loaded as an extra adapter of its base, for sampling only."""

    base: LoadedBase
    adapter: Adapter
    version: float  # the checkpoint's created_at: a re-saved checkpoint is reloaded


class CheckpointAdapters:
    def __init__(
        self, models: ModelRegistry, new: NewAdapter, checkpoints_dir: Path, size: int
    ) -> None:
        self._models, self._new, self._dir, self._size = models, new, checkpoints_dir, size
        self._cache: OrderedDict[str, CheckpointAdapter] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, path: str) -> CheckpointAdapter:
        """The adapter of checkpoint ``path`` (CheckpointNotFound / InvalidRequest if bad)."""
        directory, meta = checkpoints.resolve_existing(self._dir, path)
        key, version = str(directory), float(meta["created_at"])
        cached = self._cache.get(key)
        if cached is not None and cached.version == version:
            self._cache.move_to_end(key)
            return cached
        self._cache.pop(key, None)
        base = self._models.get(str(meta["base_model"]))
        adapter = self._new(base, "s", checkpoints.lora_spec(meta), 0)
        tensors = checkpoints.load_adapter_tensors(directory, dict(adapter.params))
        with torch.no_grad():
            for name, param in adapter.params.items():
                param.copy_(tensors[name])
        self._cache[key] = CheckpointAdapter(base, adapter, version)
        while len(self._cache) > max(1, self._size):
            self._cache.popitem(last=False)
        return self._cache[key]

    def forget(self, directory: Path) -> None:
        """Drop a deleted checkpoint's adapter."""
        self._cache.pop(str(directory), None)
