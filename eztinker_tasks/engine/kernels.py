"""Fused Triton kernels for the base's elementwise layers on CUDA (liger-kernel).

A transformer step in bf16 spends a large share of its time in memory-bound elementwise work:
RMSNorm (with its float32 upcast), the SwiGLU activation product, ... ``fuse(model)`` swaps, on
THIS model instance only, its RMSNorm and SwiGLU MLP forwards for Liger's fused Triton kernels
(Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024), where Liger
supports the architecture (Llama, Qwen2, Mistral, Gemma, ...). The MLP's projections stay the
model's own modules, so the multi-adapter LoRA layers still serve them. Rotary embeddings are
left alone (Liger patches them module-wide, for every model of the type in the process).

Nothing happens on the CPU, without liger-kernel, or with ``EZTINKER_FUSED_KERNELS=0``.
Numerics: Liger's RMSNorm follows Llama's float32 casting; results match the unfused layers
within bf16 rounding (checked by the CUDA run of the engine tests).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

log = logging.getLogger(__name__)


def enabled(device: torch.device) -> bool:
    flag = os.environ.get("EZTINKER_FUSED_KERNELS", "1").strip().lower()
    return device.type == "cuda" and flag not in ("0", "false", "no", "off")


def fuse(model: nn.Module, device: torch.device) -> bool:
    """Patch ``model``'s RMSNorm and SwiGLU MLP with Liger kernels; True if it did."""
    if not enabled(device):
        return False
    try:
        from liger_kernel.transformers.monkey_patch import (
            MODEL_TYPE_TO_APPLY_LIGER_FN,
            _apply_liger_kernel_to_instance,
        )
    except ImportError:
        return False
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    try:
        _apply_liger_kernel_to_instance(
            model=model,  # ty: ignore[invalid-argument-type]
            rope=False,
            rms_norm=True,
            swiglu=True,
            cross_entropy=False,
            fused_linear_cross_entropy=False,
        )
    except Exception as exc:  # an architecture Liger half-supports: keep the plain layers
        log.warning("fused kernels not applied to %s: %s", model_type, exc)
        return False
    return True
