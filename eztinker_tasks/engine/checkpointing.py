"""Activation checkpointing of a base's decoder layers, switched on per pass.

``activation_checkpointing(model, True)`` makes every decoder layer keep only its input during
the forward and recompute its activations in the backward (``torch.utils.checkpoint``,
non-reentrant), for the duration of the block: memory per token drops from every layer's
activations to one hidden state per layer. The base stays in eval mode (no dropout), unlike
transformers' own ``gradient_checkpointing_enable``, which acts only in training mode.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from functools import partial
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The base's stack of decoder layers: its largest ``ModuleList``."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return max(lists, key=len, default=None)


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


@contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool) -> Generator[None, None, None]:
    layers = decoder_layers(model) if enabled else None
    if layers is None:
        yield
        return
    own = [layer.__dict__.get("forward") for layer in layers]  # instance-level, if any
    for layer in layers:
        layer.forward = partial(_checkpointed, layer.forward)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for layer, forward in zip(layers, own, strict=True):
            if forward is None:
                del layer.forward  # back to the class's forward
            else:
                layer.forward = forward  # type: ignore[method-assign]
