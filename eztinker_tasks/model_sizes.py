"""How many bytes a base's weights take on a GPU worker, known before any worker loads it.

Placement (``eztinker_web.dispatch.pick_worker``) sends a base that no one-GPU worker can hold
to a multi-GPU worker. The size comes from:

- a ``shaped:`` base: its shape (``shapes.param_bytes``);
- a local model directory, or a hub model in this host's Hugging Face cache: its safetensors
  files (the index's ``total_size``, else the files' sizes), halved for float32 checkpoints,
  since GPU workers hold bases in bf16.

None when it is not known here (a built-in tiny model, an uncached hub model, a directory with
no safetensors): such a base is placed by run count alone. Torch-free (the web imports it).
"""

from __future__ import annotations

import json
from pathlib import Path

from eztinker_tasks import catalog, shapes

INDEX = "model.safetensors.index.json"


def weight_bytes(name: str) -> int | None:
    """Bytes of ``name``'s weights in bf16, or None if that cannot be known without loading."""
    shaped = shapes.param_bytes(name)
    if shaped is not None:
        return shaped
    if name in catalog.BUILTIN_MODELS:
        return None
    directory = _directory(name)
    return None if directory is None else _safetensors_bytes(directory)


def _directory(name: str) -> Path | None:
    path = Path(name)
    if path.is_dir():
        return path
    if not catalog.is_hub_id(name):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of the server extra
        return None
    cached = try_to_load_from_cache(name, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def _safetensors_bytes(directory: Path) -> int | None:
    try:
        index = directory / INDEX
        if index.is_file():
            total = int(json.loads(index.read_text())["metadata"]["total_size"])
        else:
            total = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if total <= 0:
        return None
    if str(config.get("torch_dtype") or config.get("dtype") or "") == "float32":
        total //= 2
    return total
