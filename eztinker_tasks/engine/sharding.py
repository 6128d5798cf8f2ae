"""A base sharded over a multi-GPU worker's ranks (FSDP2); shaped bases built shard by shard.

``shard(model, group)`` applies ``torch.distributed.fsdp.fully_shard`` to every decoder layer:
each rank keeps 1/K of each layer's frozen weights and all-gathers a layer just before its
forward (the next one prefetched while one computes) and again in the backward, releasing it
after; a base small next to one GPU keeps its gathered layers from the forward through the
backward instead (``reshard_after_forward``). The embedding, the final norm and the
unembedding (``lm_head``) stay whole on every rank (about 4 GB for a 128k vocabulary at width
8192 in bf16): the fused logprob kernel reads the unembedding weight directly. The LoRA
adapters are no module parameters (``multilora.Adapter``), so FSDP never sees them: they and
their AdamW state are replicated on every rank, their gradients summed by the engine
(``passes``).

``build_shaped(config, group, dtype)`` makes a ``shaped:`` base without ever holding it whole:
the model is created on the meta device, sharded, and only then given storage, each rank filling
its own shards with seeded random values (a 70B base is 140 GB: never on one device nor in host
RAM). Its weights therefore differ from the one-device build of the same name (both are noise).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from eztinker_tasks.engine.checkpointing import decoder_layers
from eztinker_tasks.engine.lockstep import Group

INIT_STD = 0.02  # transformers' default initializer_range
KEEP_GATHERED_SHARE = 0.2  # a base under this share of one GPU stays gathered between passes


def _mesh(group: Group) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(group.device.type, (group.world,))


def reshard_after_forward(model: nn.Module, group: Group) -> bool:
    """Whether a layer frees its gathered weights after the forward (and gathers them again in
    the backward): yes unless the whole base takes under ``KEEP_GATHERED_SHARE`` of one GPU.

    Kept gathered, a training step saves one all-gather per layer, and the weights stay whole
    between forwards that no backward follows (sampling): memory a small base can spare. On the
    CPU always yes. ``EZTINKER_RESHARD_AFTER_FORWARD`` = 1 / 0 forces it.
    """
    forced = os.environ.get("EZTINKER_RESHARD_AFTER_FORWARD", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if group.device.type != "cuda":
        return True
    total = torch.cuda.get_device_properties(group.device).total_memory
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return size > KEEP_GATHERED_SHARE * total


def shard(model: nn.Module, group: Group) -> int:
    """Shard every decoder layer of ``model`` over ``group`` (in place); the number of layers.

    Parameters may be on the meta device (``build_shaped``) or already on this rank's device.
    """
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers to shard")
    mesh = _mesh(group)
    reshard = reshard_after_forward(model, group)
    wrapped: list[Any] = []
    for layer in layers:
        wrapped.append(fully_shard(layer, mesh=mesh, reshard_after_forward=reshard))
    # One root over the layers (the model's body, its other parameters left whole): the layers
    # then share one communication context, and each gathers the next while computing.
    body = _body(model, layers)
    in_layers = {id(p) for p in layers.parameters()}
    whole = {p for p in body.parameters() if id(p) not in in_layers}
    fully_shard(body, mesh=mesh, reshard_after_forward=reshard, ignored_params=whole)
    for this, after in itertools.pairwise(wrapped):
        this.set_modules_to_forward_prefetch([after])
    for before, this in itertools.pairwise(wrapped):
        this.set_modules_to_backward_prefetch([before])
    return len(wrapped)


def _body(model: nn.Module, layers: nn.Module) -> nn.Module:
    """The module that runs ``layers`` (the model's base, e.g. ``LlamaModel``)."""
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if isinstance(body, nn.Module) and any(m is layers for m in body.modules()):
        return body
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def build_shaped(
    make: Callable[[], nn.Module], group: Group, dtype: torch.dtype, seed: int = 0
) -> nn.Module:
    """``make()`` on the meta device, sharded, then materialised shard by shard on this rank.

    Weights: norms 1, biases 0, every other parameter N(0, 0.02), drawn per parameter from a
    generator seeded with (seed, parameter index, rank for a shard); the whole (replicated)
    parameters are drawn alike on every rank.
    """
    from torch.distributed.tensor import DTensor

    with torch.device("meta"):
        model = make()
    model.to(dtype)
    shard(model, group)
    model.to_empty(device=group.device)
    generator = torch.Generator(group.device)
    with torch.no_grad():
        for index, (name, param) in enumerate(model.named_parameters()):
            local = param.to_local() if isinstance(param, DTensor) else param
            if local.numel() == 0:
                continue
            salt = group.rank + 1 if isinstance(param, DTensor) else 0
            generator.manual_seed(seed * 1_000_003 + index * 1009 + salt)
            if "norm" in name.rsplit(".", 2)[-2] and name.endswith("weight"):
                local.fill_(1.0)
            elif name.endswith("bias"):
                local.zero_()
            else:
                local.normal_(0.0, INIT_STD, generator=generator)
    _rebuild_buffers(model, group.device)
    return model


def _rebuild_buffers(model: nn.Module, device: torch.device) -> None:
    """Recreate the modules whose buffers are computed at construction (rotary embeddings):
    ``to_empty`` left them uninitialised."""
    config = getattr(model, "config", None)
    for name, module in list(model.named_modules()):
        if not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        with torch.device(device):
            fresh = type(module)(config=config)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, fresh)
