"""Loading a hub or local-directory base on a multi-GPU worker without holding it whole.

``load(make, directory, group, dtype)`` builds the model on the meta device (``make()``),
shards its decoder layers over the ranks (``sharding.shard``), gives it storage on this rank's
device (``to_empty``), rebuilds the buffers computed at construction (rotary embeddings), and
then fills every parameter from the checkpoint's safetensors files: a sharded parameter (an
FSDP2 ``DTensor``, split on dim 0) gets only the rows this rank holds, read with
``safe_open(...).get_slice(name)[start:stop]`` from the memory-mapped file; the parameters FSDP
leaves whole (embedding, final norm, ``lm_head``) are read whole. So a rank reads about 1/K of
the decoder layers plus the whole parameters, and its host memory peaks at about one tensor
slice, never the model (a 70B checkpoint is 140 GB in bf16).

Checkpoints: ``model.safetensors`` or ``model.safetensors.index.json`` with its shard files.
Names are mapped as ``from_pretrained`` maps them: transformers' per-model key renames
(``conversion_mapping``) and the base-model prefix added or stripped (a checkpoint of
``LlamaModel`` has no ``model.`` prefix). A tied unembedding (``lm_head`` = input embedding) is
tied again after ``to_empty`` and read once. Values are converted to the engine's dtype.
Refused with ``UnknownModel``: a checkpoint without safetensors (``.bin`` pickles are never
loaded), a parameter the checkpoint lacks or has in another shape, and keys transformers
would have to merge or split (fused MoE experts: no slice-wise read is possible).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eztinker_tasks.engine import sharding
from eztinker_tasks.engine.lockstep import Group
from eztinker_tasks.errors import UnknownModel

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin")


@dataclass
class LoadReport:
    """What one rank read from the checkpoint (bytes in the checkpoint's own dtype)."""

    files: int = 0  # safetensors files opened
    bytes_read: int = 0  # every slice and whole tensor read
    sharded_bytes_read: int = 0  # rows of sharded (decoder-layer) parameters read
    sharded_bytes_total: int = 0  # the sharded parameters' whole size in the checkpoint
    largest_read: int = 0  # the largest single read: about the rank's peak host memory
    whole: list[str] = field(default_factory=list)  # parameters read whole (not sharded)


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Each tensor name of the safetensors checkpoint in ``directory`` -> the file holding it.

    Raises ``UnknownModel``: no safetensors weights (only ``.bin`` pickles, or none at all),
    or an index naming a file outside the directory or missing.
    """
    index = directory / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UnknownModel(f"{index} has no weight_map")
        files: dict[str, Path] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
                raise UnknownModel(f"{index} names a file outside its directory: {file!r}")
            path = directory / file
            if not path.is_file():
                raise UnknownModel(f"{index} names {file}, which is missing")
            files[str(name)] = path
        return files
    single = directory / SINGLE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt", device="cpu") as handle:
            return dict.fromkeys(handle.keys(), single)
    pickles = [name for name in PICKLES if (directory / name).is_file()]
    what = f"only PyTorch pickle weights ({', '.join(pickles)})" if pickles else "no weights"
    raise UnknownModel(
        f"model {directory} has {what}: a multi-GPU worker loads safetensors checkpoints only "
        f"({SINGLE} or {INDEX}), never .bin pickles; convert it, e.g. load it with transformers "
        "and save_pretrained(..., safe_serialization=True)"
    )


def hub_directory(repo_id: str, local_only: bool) -> Path:
    """The local snapshot of hub model ``repo_id``'s config and safetensors files (downloaded
    unless ``local_only``). Raises ``UnknownModel`` if it cannot be had."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors"],
            local_files_only=local_only,
        )
    except Exception as exc:  # the hub client's errors (not found, offline, gated)
        raise UnknownModel(f"could not fetch model {repo_id!r}: {exc}") from exc
    return Path(path)


def load(
    make: Callable[[], nn.Module], directory: Path, group: Group, dtype: torch.dtype
) -> tuple[nn.Module, LoadReport]:
    """``make()`` on the meta device, sharded over ``group``, each rank filled from the
    safetensors checkpoint in ``directory`` with its own shards only.

    Returns the model (on ``group.device``, ``dtype``) and what this rank read.
    Raises ``UnknownModel`` (see the module docstring); every rank raises the same.
    """
    from torch.distributed.tensor import DTensor

    files = checkpoint_files(directory)  # before any collective: every rank refuses alike
    with torch.device("meta"):
        model = make()
    model.to(dtype)
    keys = _checkpoint_keys(model, files)
    extra_buffers = [
        name
        for name, _ in model.named_buffers()
        if not _in_rotary(model, name) and name not in keys
    ]
    if extra_buffers:
        raise UnknownModel(
            f"model {directory} has buffers neither in its checkpoint nor rebuilt "
            f"({', '.join(extra_buffers[:4])}): it cannot be loaded sharded"
        )
    sharding.shard(model, group)
    model.to_empty(device=group.device)
    _tie(model)
    report = LoadReport()
    with ExitStack() as stack, torch.no_grad():
        handles: dict[Path, Any] = {}

        def tensor_slice(name: str) -> Any:
            path = files[name]
            if path not in handles:
                from safetensors import safe_open

                handles[path] = stack.enter_context(
                    safe_open(str(path), framework="pt", device="cpu")
                )
                report.files += 1
            return handles[path].get_slice(name)

        for name, param in model.named_parameters():
            key = keys[name]
            view = tensor_slice(key)
            shape = tuple(view.get_shape())
            if shape != tuple(param.shape):
                raise UnknownModel(
                    f"model {directory}: {key} has shape {list(shape)} in the checkpoint, "
                    f"the model's {name} {list(param.shape)}"
                )
            if isinstance(param, DTensor):
                local = param.to_local()
                start, stop = _rows(param)
                if stop - start != local.shape[0]:
                    raise AssertionError(f"{name}: local shard of {local.shape[0]} rows")
                values = view[start:stop] if stop > start else None
                report.sharded_bytes_total += _nbytes(shape, view.get_dtype())
            else:
                local, values = param, view[:]
                report.whole.append(name)
            if values is not None:
                local.copy_(values)
                read = values.numel() * values.element_size()
                report.bytes_read += read
                report.largest_read = max(report.largest_read, read)
                if isinstance(param, DTensor):
                    report.sharded_bytes_read += read
                del values
        for name, buffer in model.named_buffers():
            if name in keys:
                buffer.copy_(tensor_slice(keys[name])[:])
    sharding.rebuild_buffers(model, group.device)
    return model, report


def _rows(param: Any) -> tuple[int, int]:
    """The global rows [start, stop) of dim 0 that this rank's shard of DTensor ``param`` holds."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not all(isinstance(p, Shard) and p.dim == 0 for p in param.placements):
        raise AssertionError(f"unexpected placements {param.placements}")
    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    return int(offset[0]), int(offset[0]) + int(shape[0])


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    sizes = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1}
    count = 1
    for size in shape:
        count *= size
    return count * sizes.get(dtype, 1)


def _in_rotary(model: nn.Module, buffer: str) -> bool:
    owner = buffer.rpartition(".")[0]
    return type(model.get_submodule(owner)).__name__.endswith("RotaryEmbedding")


def _tie(model: nn.Module) -> None:
    """Tie the unembedding to the input embedding again (``to_empty`` gave each its own
    tensor) when the config ties them."""
    config = getattr(model, "config", None)
    get_config = getattr(config, "get_text_config", None)
    text = get_config() if callable(get_config) else config
    if not getattr(text, "tie_word_embeddings", False):
        return
    inputs = getattr(model, "get_input_embeddings", lambda: None)()
    outputs = getattr(model, "get_output_embeddings", lambda: None)()
    if isinstance(inputs, nn.Module) and isinstance(outputs, nn.Module):
        outputs.weight = inputs.weight


def _checkpoint_keys(model: nn.Module, files: dict[str, Path]) -> dict[str, str]:
    """Each parameter (and persistent buffer) name of ``model`` -> its key in the checkpoint.

    Checkpoint keys are renamed as ``from_pretrained`` renames them (transformers' conversion
    mapping, then the base-model prefix added or stripped). A tied parameter may come from
    any of its names. Raises ``UnknownModel`` for a missing parameter or a key transformers
    would merge or split (no slice of it can be read).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    state = model.state_dict(keep_vars=True)
    transforms = get_model_conversion_mapping(model)  # ty: ignore[invalid-argument-type]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None
    found: dict[str, str] = {}
    merged: list[str] = []
    for key in files:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, state)  # ty: ignore[invalid-argument-type]
        if pattern is not None:
            merged.append(key)
        elif renamed in state:
            found.setdefault(renamed, key)
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    keys: dict[str, str] = {}
    missing: list[str] = []
    for name, _ in model.named_parameters():
        key = next((found[n] for n in names[id(model.get_parameter(name))] if n in found), None)
        if key is None:
            missing.append(name)
        else:
            keys[name] = key
    if merged and missing:
        raise UnknownModel(
            f"this checkpoint's {merged[0]} (and {len(merged) - 1} more) must be merged or "
            "split to fit the model (transformers' weight conversion): not loadable sharded"
        )
    if missing:
        raise UnknownModel(
            f"the checkpoint lacks {len(missing)} of the model's parameters "
            f"(e.g. {', '.join(missing[:3])})"
        )
    for name, buffer in model.named_buffers():
        if name in found and buffer is not None:
            keys[name] = found[name]
    return keys


__all__ = ["LoadReport", "checkpoint_files", "hub_directory", "load"]
