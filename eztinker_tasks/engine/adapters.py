"""LoRA targets and PEFT interchange: which modules an adapter covers, and its PEFT config.

- ``discover_targets`` finds the attention and MLP ``Linear``/``Conv1D`` modules by path and the
  unembedding (``lm_head``), so Qwen2, Llama and GPT-2 style models all work;
- ``target_modules`` is the subset a ``LoraSpec`` trains;
- ``lora_config`` is the ``peft.LoraConfig`` that describes such an adapter in a checkpoint
  (PEFT is the file format; the compute path is ``multilora``);
- ``tied_unembedding`` / ``input_embedding_weight`` tell how the unembedding relates to the
  input embedding (see ``checkpoints._export_tied_unembedding``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
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

    @property
    def all(self) -> tuple[str, ...]:
        return (*self.attn, *self.mlp, *((self.unembed,) if self.unembed else ()))


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


@dataclass
class AdapterConfig:
    """What a checkpoint's ``adapter_config.json`` says of one run's adapter (``peft()`` is the
    PEFT ``LoraConfig``; PEFT is imported only then: it takes seconds, and a worker needs it
    only to write checkpoints)."""

    r: int
    lora_alpha: float
    target_modules: list[str]
    base_model_name_or_path: str
    modules_to_save: list[str] | None = None

    def peft(self, inference_mode: bool = True) -> Any:
        from peft import LoraConfig

        config = LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,  # ty: ignore[invalid-argument-type]  (annotated int)
            lora_dropout=0.0,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=self.base_model_name_or_path,
            inference_mode=inference_mode,
        )
        if self.modules_to_save is not None:
            config.modules_to_save = list(self.modules_to_save)
        return config


def lora_config(targets: Targets, spec: LoraSpec, base_name_or_path: str) -> AdapterConfig:
    """The PEFT config of one run: exact module paths, dropout 0, alpha defaulting to 32."""
    alpha = DEFAULT_ALPHA if spec.alpha is None else float(spec.alpha)
    return AdapterConfig(
        r=spec.rank,
        lora_alpha=alpha,
        target_modules=target_modules(targets, spec),
        base_model_name_or_path=base_name_or_path,
    )


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
