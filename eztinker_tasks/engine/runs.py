"""Per-run state: the run's adapter parameters, optimizer, RNG and counters.

A run owns nothing of the base model: only its adapter (its own LoRA factors, served by the
base's multi-adapter layers), an AdamW optimizer over those factors, a ``torch.Generator`` and
its counters.
``checked_lora_spec`` validates a requested ``LoraSpec`` and records its defaults.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace

import torch

from eztinker_tasks.engine.adapters import DEFAULT_ALPHA, tensor_bytes
from eztinker_tasks.engine.models import LoadedBase
from eztinker_tasks.engine.multilora import Adapter
from eztinker_tasks.errors import InvalidRequest
from eztinker_tasks.limits import check_lora_spec
from eztinker_tasks.types import LoraSpec, RunInfo


def make_optimizer(params: list[torch.Tensor], device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``params``; hyper-parameters are set on the group at every step."""
    return torch.optim.AdamW(params, lr=0.0, fused=device.type == "cuda")


@dataclass
class RunState:
    run_id: str
    base: LoadedBase
    adapter: Adapter  # the run's LoRA factors on the base's multi-adapter layers
    lora: LoraSpec  # with the seed that was actually used
    params: dict[str, torch.Tensor]  # canonical PEFT name -> view of the adapter's leaves
    optimizer: torch.optim.AdamW
    generator: torch.Generator  # the run's own RNG (sampling from the run without a seed)
    step: int = 0
    tokens_trained: int = 0
    last_loss: float | None = None

    def adapter_bytes(self) -> int:
        return tensor_bytes(self.leaves)

    def optimizer_bytes(self) -> int:
        return tensor_bytes(
            value
            for state in self.optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        )

    @property
    def leaves(self) -> list[torch.Tensor]:
        """What the optimizer steps: the adapter's flat factor tensors."""
        return self.adapter.leaves

    def has_grad(self) -> bool:
        return any(leaf.grad is not None for leaf in self.leaves)

    def info(self) -> RunInfo:
        return RunInfo(
            run_id=self.run_id,
            base_model=self.base.name,
            lora=self.lora,
            step=self.step,
            tokens_trained=self.tokens_trained,
            last_loss=self.last_loss,
            trainable_params=sum(p.numel() for p in self.params.values()),
            adapter_bytes=self.adapter_bytes(),
            optimizer_bytes=self.optimizer_bytes(),
            extra={
                "adapter_name": self.adapter.name,
                "lora_modules": len(self.params) // 2,
                "has_accumulated_grad": self.has_grad(),
            },
        )


def checked_lora_spec(lora: LoraSpec) -> LoraSpec:
    """Validate a LoRA spec; fill alpha (32) and the seed (random) so the run records them."""
    if not isinstance(lora, LoraSpec):
        raise InvalidRequest("lora must be a LoraSpec", errors={"lora": ["wrong type"]})
    check_lora_spec(lora)
    alpha = DEFAULT_ALPHA if lora.alpha is None else lora.alpha
    seed = secrets.randbits(31) if lora.seed is None else lora.seed
    return replace(lora, alpha=float(alpha), seed=seed)
