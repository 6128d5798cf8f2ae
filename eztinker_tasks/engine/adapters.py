"""LoRA adapters on a shared base: target discovery, configs, add/delete, parameter names.

Every base has at most one ``PeftModel`` that holds many named adapters (one per run, plus
saved sampler checkpoints that are loaded for sampling). This module owns that PEFT plumbing:

- ``discover_targets`` finds the attention and MLP ``Linear``/``Conv1D`` modules by path and the
  unembedding (``lm_head``), so Qwen2, Llama and GPT-2 style models all work;
- ``lora_config`` turns a ``LoraSpec`` into a ``peft.LoraConfig``;
- ``add_adapter`` / ``remove_adapter`` create the PeftModel on first use and unwrap the base
  again when its last adapter goes, so a deleted run leaves nothing behind;
- ``adapter_parameters`` maps an adapter's parameters to their canonical PEFT state-dict names
  (``...q_proj.lora_A.weight``), the names used in checkpoints.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from eztinker_tasks.types import LoraSpec

DEFAULT_ALPHA = 32.0
_ATTN_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward")


@dataclass(frozen=True)
class Targets:
    """Module paths (relative to the base model) that LoRA can wrap."""

    attn: tuple[str, ...]
    mlp: tuple[str, ...]
    unembed: str | None


def discover_targets(model: nn.Module) -> Targets:
    """Classify the model's Linear/Conv1D modules as attention or MLP by their path."""
    output = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    attn: list[str] = []
    mlp: list[str] = []
    unembed: str | None = None
    for name, module in model.named_modules():
        if output is not None and module is output:
            unembed = name if isinstance(module, nn.Linear) else None
            continue
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        parts = name.lower().split(".")
        if any(word in part for part in parts for word in _ATTN_WORDS):
            attn.append(name)
        elif any(word in part for part in parts for word in _MLP_WORDS):
            mlp.append(name)
    return Targets(tuple(attn), tuple(mlp), unembed)


def target_modules(targets: Targets, spec: LoraSpec) -> list[str]:
    modules: list[str] = []
    if spec.train_attn:
        modules += targets.attn
    if spec.train_mlp:
        modules += targets.mlp
    if spec.train_unembed and targets.unembed is not None:
        modules.append(targets.unembed)
    return modules


def lora_config(targets: Targets, spec: LoraSpec, base_name_or_path: str) -> LoraConfig:
    """The PEFT config of one run: exact module paths, dropout 0, alpha defaulting to 32."""
    alpha = DEFAULT_ALPHA if spec.alpha is None else float(spec.alpha)
    return LoraConfig(
        r=spec.rank,
        lora_alpha=alpha,  # ty: ignore[invalid-argument-type]  (PEFT annotates int, takes float)
        lora_dropout=0.0,
        target_modules=target_modules(targets, spec),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name_or_path,
    )


@contextmanager
def _quiet_peft() -> Generator[None, None, None]:
    """Silence PEFT's notices that do not apply here (we never merge adapters)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
        yield


def add_adapter(
    model: nn.Module, peft: PeftModel | None, name: str, config: LoraConfig, seed: int
) -> PeftModel:
    """Add adapter ``name`` (LoRA init seeded by ``seed``, global RNG untouched).

    Wraps ``model`` in a new PeftModel when ``peft`` is None; returns the PeftModel.
    """
    devices = [p.device.index for p in model.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices), _quiet_peft():
        torch.manual_seed(seed)
        if peft is None:
            peft = get_peft_model(model, config, adapter_name=name)
        else:
            peft.add_adapter(name, config)
    assert peft is not None
    for param in adapter_parameters(peft, name).values():
        param.requires_grad_(False)
    return peft


def remove_adapter(peft: PeftModel, name: str) -> nn.Module | None:
    """Delete adapter ``name``. Returns the unwrapped base model if it was the last one."""
    if set(peft.peft_config) == {name}:
        with _quiet_peft():
            base = peft.unload()
        return base
    with _quiet_peft():
        peft.delete_adapter(name)
    return None


def activate(peft: PeftModel, name: str) -> None:
    """Make ``name`` the only active adapter (its parameters trainable, all others frozen)."""
    with _quiet_peft():
        peft.set_adapter(name)


def adapter_parameters(peft: PeftModel, name: str) -> dict[str, nn.Parameter]:
    """Canonical PEFT state-dict name -> parameter, for adapter ``name``, sorted by name."""
    pattern = re.compile(rf"\.(lora_[A-Za-z_]+)\.{re.escape(name)}(\.|$)")
    params: dict[str, nn.Parameter] = {}
    for full, param in peft.named_parameters():
        canonical, hits = pattern.subn(r".\1\2", full)
        if hits:
            params[canonical] = param
    return dict(sorted(params.items()))


def tied_unembedding(model: nn.Module) -> nn.Module | None:
    """The output embedding (``lm_head``) if it shares its weight with the input embedding.

    On such a base an ``lm_head`` LoRA delta is NOT an embedding delta: the run's model applies
    it to the logits only, and the input embedding stays the base's.
    """
    if not isinstance(model, PreTrainedModel):
        return None
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or inputs is None:
        return None
    weight = getattr(output, "weight", None)
    if weight is None or weight is not getattr(inputs, "weight", None):
        return None
    return output


def input_embedding_weight(model: nn.Module) -> torch.Tensor:
    """The base's input embedding matrix [vocab, hidden] (detached, on its device)."""
    embedding = model.get_input_embeddings() if isinstance(model, PreTrainedModel) else None
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no input embedding matrix")
    return weight.detach()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
