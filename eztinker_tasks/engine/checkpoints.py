"""Checkpoints on disk: atomic writes, the two formats, listing and deletion.

A checkpoint is the directory ``checkpoints_dir/<run_id>/<name>/``. Both kinds hold the adapter
in standard PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``), which plain
``PeftModel.from_pretrained(base, dir)`` loads. A "state" checkpoint adds ``optimizer.safetensors``
(AdamW moments) + ``optimizer.json`` (per-parameter step counts, hyper-parameters) and
``eztinker_state.json`` (step, tokens, LoRA spec, base model, the run's RNG state); a "sampler"
checkpoint adds ``eztinker_sampler.json``. The metadata file is written last, and the whole
directory is built in a temp dir and renamed into place (swapped atomically with an existing
checkpoint of the same name), so a crash never leaves a half checkpoint that looks valid.
Only safetensors and JSON are written or read: never pickle.

``adapter_config.json`` names the base by what a user can resolve: a hub id, or the absolute
path of a local (or built-in) model directory. On a base whose unembedding is tied to the input
embedding, a trained unembedding is exported as PEFT ``modules_to_save`` (see
``_export_tied_unembedding``) so that PEFT's load AND merge both give the run's model.
"""

from __future__ import annotations

import base64
import copy
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from eztinker_tasks import checkpoint_paths
from eztinker_tasks.atomic_dirs import write_atomically
from eztinker_tasks.engine.adapters import AdapterConfig, input_embedding_weight, lora_config
from eztinker_tasks.engine.runs import RunState, checked_lora_spec, make_optimizer
from eztinker_tasks.errors import CheckpointNotFound, InvalidRequest
from eztinker_tasks.types import CheckpointInfo, CheckpointKind, LoraSpec, RunInfo

FORMAT_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# On a tied-embedding base: the unembedding's LoRA factors (the PEFT files hold it merged).
UNEMBED_LORA = "eztinker_unembed_lora.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
META_FILES: dict[CheckpointKind, str] = {
    "state": "eztinker_state.json",
    "sampler": "eztinker_sampler.json",
}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- writing


@dataclass
class Captured:
    """A run's checkpoint, copied aside: ready to be written anywhere, any time later.

    ``tensors``: safetensors file name -> its tensors, copies made on the run's device (a
    device-to-device copy: the operation thread never waits for the host); ``write`` moves
    them to the host. ``documents``: JSON file name -> its content; ``meta``: the kind's
    metadata file, written last. ``tied``: on a tied-embedding base whose unembedding the run
    trains, (module name, the base's input embedding) for the PEFT export (see
    ``_export_tied_unembedding``), done by ``write`` too.
    """

    config: AdapterConfig  # what adapter_config.json says (PEFT's LoraConfig writes it)
    tensors: dict[str, dict[str, torch.Tensor]]
    documents: dict[str, dict[str, Any]]
    meta_file: str
    meta: dict[str, Any]
    tied: tuple[str, torch.Tensor] | None = None
    copied: Any = None  # a CUDA event recorded after the copies (None on the CPU)

    def write(self, directory: Path) -> None:
        """Write every file into ``directory`` (the metadata file last); any thread."""
        if self.copied is not None:
            self.copied.synchronize()
        host = {
            name: {k: t.to("cpu", copy=True).contiguous() for k, t in tensors.items()}
            for name, tensors in self.tensors.items()
        }
        config = replace(self.config)
        if self.tied is not None:
            unembed, embedding = self.tied
            host[UNEMBED_LORA] = _export_tied_unembedding(
                embedding, config, unembed, host[ADAPTER_WEIGHTS]
            )
        config.peft().save_pretrained(str(directory))
        for name, tensors in host.items():
            save_file(tensors, str(directory / name), metadata={"format": "pt"})
        for name, document in self.documents.items():
            _write_json(directory / name, document)
        _write_json(directory / self.meta_file, self.meta)  # last: marks the checkpoint complete


def capture(run: RunState, kind: CheckpointKind, name: str) -> Captured:
    """Copy a "state" or "sampler" checkpoint of ``run`` aside (see ``Captured``)."""
    config = lora_config(run.base.targets, run.lora, run.base.source)
    # Two flat copies (not one per tensor: hundreds of small copies cost more than the bytes).
    flat_a, flat_b = (leaf.detach().clone() for leaf in run.adapter.leaves)
    adapter = run.adapter.named_views(flat_a, flat_b)
    files: dict[str, dict[str, torch.Tensor]] = {ADAPTER_WEIGHTS: adapter}
    unembed = run.base.targets.unembed
    tied = None
    if run.base.tied_unembedding and unembed is not None and unembed in config.target_modules:
        tied = (unembed, input_embedding_weight(run.base.model))
    documents: dict[str, dict[str, Any]] = {}
    meta = _meta(run, kind, name)
    if kind == "state":
        files[OPTIMIZER_TENSORS], documents[OPTIMIZER_JSON] = _optimizer_state(run)
        state = run.generator.get_state()
        meta["rng_device"] = run.generator.device.type
        meta["rng_state"] = base64.b64encode(state.numpy().tobytes()).decode()
    copied = None
    device = run.adapter.flat_a.device
    if device.type == "cuda":
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(device))
    return Captured(config, files, documents, META_FILES[kind], meta, tied, copied)


def _export_tied_unembedding(
    embedding: torch.Tensor,
    config: AdapterConfig,
    unembed: str,
    tensors: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """On a tied base, export the trained unembedding as a full ``modules_to_save`` matrix.

    The run applies its ``lm_head`` LoRA delta to the logits only; its input embedding stays
    the base's. PEFT's ``merge_and_unload`` would write an ``lm_head`` LoRA delta into the ONE
    matrix both share, changing the input embedding too. So the PEFT files carry the unembedding
    as ``modules_to_save`` (``W + (alpha / r) * B @ A`` in the base's dtype): PEFT then keeps a
    separate copy, loading is exact, and merging unties the two (PEFT sets
    ``tie_word_embeddings=False``). The LoRA factors themselves (returned) go to
    ``UNEMBED_LORA`` for EZTinker's own loading (resume, sampling). ``tensors`` (host copies)
    and ``config`` are changed in place; ``embedding`` is the frozen base's (read only).
    """
    prefix = f"base_model.model.{unembed}"
    factors = {key: tensors.pop(key) for key in list(tensors) if key.startswith(f"{prefix}.lora_")}
    a, b = factors[f"{prefix}.lora_A.weight"], factors[f"{prefix}.lora_B.weight"]
    scaling = float(config.lora_alpha) / float(config.r)
    merged = embedding.to("cpu", torch.float32) + scaling * (b.float() @ a.float())
    tensors[f"{prefix}.weight"] = merged.to(embedding.dtype).contiguous()
    config.target_modules = sorted(set(config.target_modules) - {unembed})
    config.modules_to_save = [unembed]
    return factors


def _meta(run: RunState, kind: CheckpointKind, name: str) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "run_id": run.run_id,
        "name": name,
        "step": run.step,
        "tokens_trained": run.tokens_trained,
        "last_loss": run.last_loss,
        "base_model": run.base.name,
        "base_model_source": run.base.source,
        "lora": run.lora.to_dict(),
        "tied_unembedding": run.base.tied_unembedding,
        "created_at": time.time(),
    }


def save(checkpoints_dir: Path, run: RunState, name: str, kind: CheckpointKind) -> CheckpointInfo:
    """Write a "state" or "sampler" checkpoint of ``run`` named ``name``."""
    checkpoint_paths.validate_name(name)
    final = checkpoint_paths.resolve(
        checkpoints_dir, checkpoint_paths.format_path(run.run_id, name)
    )
    write_atomically(final, capture(run, kind, name).write)
    return info_from_dir(final)


def _optimizer_state(run: RunState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW moments per canonical parameter name (views of the flat leaves' state), and the
    per-parameter step counts and hyper-parameters."""
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    adapter = run.adapter
    state_a = run.optimizer.state.get(adapter.flat_a, {})
    state_b = run.optimizer.state.get(adapter.flat_b, {})
    for key in sorted(set(state_a) & set(state_b)):
        value_a, value_b = state_a[key], state_b[key]
        if key == "step":
            steps.update(dict.fromkeys(run.params, float(value_a)))
        elif isinstance(value_a, torch.Tensor) and isinstance(value_b, torch.Tensor):
            views = adapter.named_views(value_a.detach().clone(), value_b.detach().clone())
            for name, view in views.items():
                tensors[f"{name}:{key}"] = view
    group = {k: v for k, v in run.optimizer.param_groups[0].items() if k != "params"}
    document = {"param_names": list(run.params), "steps": steps, "param_group": _jsonable(group)}
    return tensors, document


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


# ---------------------------------------------------------------- reading


def resolve_existing(checkpoints_dir: Path, path: str) -> tuple[Path, dict[str, Any]]:
    """The directory and metadata of checkpoint ``path``; CheckpointNotFound if absent."""
    directory = checkpoint_paths.resolve(checkpoints_dir, path)
    return directory, read_meta(directory, path)


def read_meta(directory: Path, shown: str | None = None) -> dict[str, Any]:
    """The metadata of the checkpoint in ``directory``; CheckpointNotFound if it has none."""
    for kind_file in META_FILES.values():
        meta_path = directory / kind_file
        if meta_path.is_file():
            return json.loads(meta_path.read_text())
    path = shown or str(directory)
    raise CheckpointNotFound(f"checkpoint {path!r} does not exist", errors={"path": [path]})


def info_from_dir(directory: Path) -> CheckpointInfo:
    run_id, name = directory.parent.name, directory.name
    _, meta = resolve_existing(directory.parent.parent, checkpoint_paths.format_path(run_id, name))
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    return CheckpointInfo(
        run_id=run_id,
        name=name,
        kind=meta["kind"],
        path=checkpoint_paths.format_path(run_id, name),
        directory=str(directory),
        step=int(meta["step"]),
        base_model=str(meta["base_model"]),
        created_at=float(meta["created_at"]),
        size_bytes=size,
    )


def lora_spec(meta: dict[str, Any]) -> LoraSpec:
    return LoraSpec.from_dict(meta["lora"])


def load_adapter_tensors(directory: Path, expected: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Adapter tensors from ``directory``, checked against the names and shapes expected."""
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    if (directory / UNEMBED_LORA).is_file():  # a tied unembedding: its factors live apart
        tensors = {k: v for k, v in tensors.items() if ".lora_" in k}
        tensors.update(load_file(str(directory / UNEMBED_LORA)))
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise InvalidRequest(
            f"checkpoint adapter does not match the run's adapter "
            f"(missing {missing[:3]}, unexpected {extra[:3]})",
            errors={"path": ["adapter mismatch"]},
        )
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise InvalidRequest(
                f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, "
                f"the run expects {tuple(expected[key].shape)}",
                errors={"path": ["shape mismatch"]},
            )
    return tensors


def optimizer_state_dict(directory: Path, run: RunState, fresh: dict[str, Any]) -> dict[str, Any]:
    """An AdamW ``state_dict`` for ``run`` (its two flat leaves) from the checkpoint's files."""
    spec = json.loads((directory / OPTIMIZER_JSON).read_text())
    if spec["param_names"] != list(run.params):
        raise InvalidRequest("checkpoint optimizer does not match the run's adapter")
    tensors = load_file(str(directory / OPTIMIZER_TENSORS))
    adapter = run.adapter
    keys = sorted({key.split(":", 1)[1] for key in tensors})
    entries: list[dict[str, torch.Tensor]] = [{}, {}]
    for key in keys:
        named = {name: tensors.get(f"{name}:{key}") for name in run.params}
        if any(value is None for value in named.values()):
            continue
        flat_a = torch.zeros_like(adapter.flat_a, device="cpu")
        flat_b = torch.zeros_like(adapter.flat_b, device="cpu")
        for name, view in adapter.named_views(flat_a, flat_b).items():
            value = named[name]
            assert value is not None
            if value.shape != view.shape:
                raise InvalidRequest("checkpoint optimizer state has the wrong shape")
            view.copy_(value)
        entries[0][key], entries[1][key] = flat_a, flat_b
    step = next(iter(spec["steps"].values()), None)
    if step is not None:
        for entry in entries:
            entry["step"] = torch.tensor(step, dtype=torch.float32)
    state = {i: entry for i, entry in enumerate(entries) if entry}
    groups = copy.deepcopy(fresh["param_groups"])
    for key, value in spec["param_group"].items():
        if key in groups[0] and isinstance(value, (int, float, list)):
            groups[0][key] = tuple(value) if isinstance(value, list) else value
    return {"state": state, "param_groups": groups}


def load_into(
    run: RunState, directory: Path, meta: dict[str, Any], optimizer: bool, device: torch.device
) -> RunInfo:
    """Load the checkpoint in ``directory`` into ``run``: adapter weights, and with
    ``optimizer`` the AdamW state and RNG; step and counters. Everything is validated before
    the run changes (InvalidRequest: another base, LoRA shape or kind)."""
    check_kind(meta, optimizer)
    check_compatible(run, meta)
    tensors = load_adapter_tensors(directory, dict(run.params))
    fresh = make_optimizer(run.leaves, device)
    state = optimizer_state_dict(directory, run, fresh.state_dict()) if optimizer else None
    with torch.no_grad():
        for name, param in run.params.items():
            param.copy_(tensors[name])
    for leaf in run.leaves:
        leaf.grad = None
    if state is not None:
        fresh.load_state_dict(state)
        restore_rng(run, meta)
    run.optimizer = fresh
    run.step = int(meta["step"])
    run.tokens_trained = int(meta.get("tokens_trained", 0))
    run.last_loss = meta.get("last_loss", run.last_loss)
    return run.info()


def restore_rng(run: RunState, meta: dict[str, Any]) -> None:
    encoded = meta.get("rng_state")
    if encoded is None or meta.get("rng_device") != run.generator.device.type:
        run.generator.manual_seed(int(meta.get("lora", {}).get("seed") or 0) + int(meta["step"]))
        return
    raw = bytearray(base64.b64decode(encoded))
    run.generator.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())


def check_kind(meta: Mapping[str, Any], optimizer: bool) -> None:
    if optimizer and meta.get("kind") != "state":
        raise InvalidRequest(
            "a sampler checkpoint has no optimizer state: load its weights only (without the "
            "optimizer state)",
            errors={"path": ["not a state checkpoint"]},
        )


def check_compatible(run: RunState, meta: Mapping[str, Any]) -> None:
    """A checkpoint fits a run only with the same base and the same LoRA shape."""
    if meta.get("base_model") != run.base.name:
        raise InvalidRequest(
            f"checkpoint was trained on {meta.get('base_model')!r}, run {run.run_id!r} is on "
            f"{run.base.name!r}",
            errors={"path": ["base model mismatch"]},
        )
    saved = checked_lora_spec(lora_spec(dict(meta)))
    for key in ("rank", "alpha", "train_attn", "train_mlp", "train_unembed"):
        if getattr(saved, key) != getattr(run.lora, key):
            raise InvalidRequest(
                f"checkpoint LoRA {key}={getattr(saved, key)!r} does not match run "
                f"{run.run_id!r} ({key}={getattr(run.lora, key)!r})",
                errors={"path": [f"{key} mismatch"]},
            )
