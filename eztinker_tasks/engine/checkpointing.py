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

from eztinker_tasks.engine.multilora import LoraContext


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The base's stack of decoder layers: its largest ``ModuleList``."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return max(lists, key=len, default=None)


def _checkpointed(
    forward: Any, context: LoraContext, config: Any, *args: Any, **kwargs: Any
) -> Any:
    # The recomputation in the backward must see what the forward saw: the same adapters
    # (LoRA route) and the same attention implementation (packed).
    route, attention = context.route, config._attn_implementation

    def run(*a: Any, **k: Any) -> Any:
        previous = context.route, config._attn_implementation
        context.route, config._attn_implementation = route, attention
        try:
            return forward(*a, **k)
        finally:
            context.route, config._attn_implementation = previous

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


@contextmanager
def activation_checkpointing(
    model: nn.Module, context: LoraContext, enabled: bool
) -> Generator[None, None, None]:
    """Checkpoint every decoder layer of ``model`` inside the block (if ``enabled``).

    The forward's LoRA route and attention implementation are replayed in the recomputation.
    """
    layers = decoder_layers(model) if enabled else None
    if layers is None:
        yield
        return
    config = getattr(model, "config")  # noqa: B009
    own = [layer.__dict__.get("forward") for layer in layers]  # instance-level, if any
    for layer in layers:
        layer.forward = partial(_checkpointed, layer.forward, context, config)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for layer, forward in zip(layers, own, strict=True):
            if forward is None:
                del layer.forward  # back to the class's forward
            else:
                layer.forward = forward  # type: ignore[method-assign]
