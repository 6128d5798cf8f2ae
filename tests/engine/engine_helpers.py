"""Shared helpers of the engine tests: building datums, training, tolerances, internals."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from eztinker_tasks.engine import Engine, EngineConfig
from eztinker_tasks.engine.runs import RunState
from eztinker_tasks.types import AdamParams, Datum, LoraSpec

DEVICE = os.environ.get("EZTINKER_TEST_DEVICE", "cpu")
DTYPE = os.environ.get("EZTINKER_TEST_DTYPE", "auto")
TINY_MODELS = ("tiny-gpt2", "tiny-llama")
SENTENCE = "The quick brown fox jumps over the lazy dog."


def datum(
    tokens: Sequence[Any],
    targets: Sequence[Any] | None = None,
    weights: Sequence[float] | None = None,
    **extra: Sequence[float],
) -> Datum:
    """A datum; targets default to next-token targets (last one predicts token 0)."""
    tokens = list(tokens)
    if targets is None:
        targets = [*tokens[1:], 0]
    inputs: dict[str, Sequence[float]] = {"target_tokens": list(targets)}
    if weights is not None:
        inputs["weights"] = list(weights)
    inputs.update(extra)
    return Datum(tokens=tuple(tokens), loss_fn_inputs=inputs)


def sequence_datum(ids: Sequence[int]) -> Datum:
    """Teach the model the whole sequence ``ids`` (input ids[:-1], targets ids[1:])."""
    return datum(ids[:-1], ids[1:])


def encode(engine: Engine, base_model: str, text: str) -> list[int]:
    tokenizer = engine.models.get(base_model).tokenizer
    assert tokenizer is not None
    return list(tokenizer(text).input_ids)


def run_state(engine: Engine, run_id: str) -> RunState:
    """The engine's internal state of a run (tests inspect parameters and gradients)."""
    return engine._runs[run_id]


def grads_copy(engine: Engine, run_id: str) -> dict[str, torch.Tensor]:
    """A copy of every adapter gradient of the run (each must exist)."""
    grads = run_state(engine, run_id).adapter.grads()
    out = {}
    for key, grad in grads.items():
        assert grad is not None, key
        out[key] = grad.detach().clone()
    return out


def grad_of(engine: Engine, run_id: str, name: str) -> torch.Tensor:
    """A copy of the gradient of one adapter tensor (by canonical name); it must exist."""
    grad = run_state(engine, run_id).adapter.grads()[name]
    assert grad is not None, name
    return grad.detach().clone()


def params_copy(engine: Engine, run_id: str) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in run_state(engine, run_id).params.items()}


def train(
    engine: Engine, run_id: str, data: Sequence[Datum], steps: int, lr: float = 1e-3
) -> list[float]:
    losses = []
    for _ in range(steps):
        losses.append(engine.forward_backward(run_id, data).metrics["loss:sum"])
        engine.optim_step(run_id, AdamParams(learning_rate=lr))
    return losses


def new_run(
    engine: Engine, run_id: str, base_model: str, rank: int = 8, seed: int = 0, **lora
) -> None:
    engine.create_run(run_id, base_model, LoraSpec(rank=rank, seed=seed, **lora))


def peft_reference(engine: Engine, run_id: str) -> torch.nn.Module:
    """An independent reference of a run's model: a fresh copy of its base wrapped by PLAIN
    PEFT (its own LoRA layers, one adapter), with the run's adapter weights copied in."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from eztinker_tasks.engine.adapters import lora_config

    run = run_state(engine, run_id)
    plain = AutoModelForCausalLM.from_pretrained(
        run.base.source, dtype=engine.dtype, attn_implementation="eager"
    ).to(engine.device)
    peft = get_peft_model(
        plain, lora_config(run.base.targets, run.lora, run.base.source).peft(False)
    )
    named = dict(peft.named_parameters())
    with torch.no_grad():
        for canonical, value in run.params.items():
            module, _, rest = canonical.removeprefix("base_model.model.").rpartition(".lora_")
            factor = rest.split(".")[0]
            named[f"base_model.model.{module}.lora_{factor}.default.weight"].copy_(value)
    return peft.eval()


def is_fp32(engine: Engine) -> bool:
    return engine.dtype == torch.float32


def exact_device(engine: Engine) -> bool:
    """Bitwise reproducibility is promised on CPU only."""
    return engine.device == "cpu"


def logprob_atol(engine: Engine) -> float:
    return 5e-5 if is_fp32(engine) else 6e-2


def rel_tol(engine: Engine) -> float:
    return 2e-4 if is_fp32(engine) else 5e-2


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))


def assert_same_tensors(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True
) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:  # GPU backward passes may differ in the last bits; Adam amplifies that a little
            assert rel_err(a[key], b[key]) < 1e-2, key


def new_engine(data_dir: Path, checkpoints_dir: Path, **config: Any) -> Engine:
    """An engine on the test device and dtype; ``config`` overrides ``EngineConfig`` fields."""
    return Engine(
        EngineConfig(
            data_dir=data_dir,
            checkpoints_dir=checkpoints_dir,
            device=DEVICE,
            dtype=DTYPE,
            **config,
        )
    )
