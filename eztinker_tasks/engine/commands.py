"""The commands rank 0 of a multi-GPU worker sends its other ranks, and the followers' loop.

A command is one engine operation and its arguments as JSON (``{"op": ..., ...}``), sent in a
uint8 tensor after its length (``torch.distributed.broadcast`` from rank 0): nothing is pickled
between ranks. ``apply`` runs one on a rank's engine; ``follow`` is a follower rank's loop.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from eztinker_tasks.engine import lockstep
from eztinker_tasks.engine.engine import Engine
from eztinker_tasks.errors import EZTinkerError
from eztinker_tasks.types import (
    AdamParams,
    CallSpec,
    Datum,
    LoraSpec,
    SampleCall,
    SampleSource,
    SamplingParams,
)


def send(command: Mapping[str, Any], group: lockstep.Group) -> None:
    """Broadcast ``command`` (JSON) from rank 0: its byte length, then its bytes."""
    payload = json.dumps(command, separators=(",", ":")).encode()
    size = torch.tensor([len(payload)], dtype=torch.int64, device=group.device)
    dist.broadcast(size, src=0)
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(group.device)
    dist.broadcast(data, src=0)


def receive(group: lockstep.Group) -> dict[str, Any]:
    """The next command rank 0 sends (blocks until it does)."""
    size = torch.zeros(1, dtype=torch.int64, device=group.device)
    dist.broadcast(size, src=0)
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=group.device)
    dist.broadcast(data, src=0)
    return json.loads(bytes(data.cpu().numpy()).decode())


def spec_dict(spec: CallSpec) -> dict[str, Any]:
    return {
        "run_id": spec.run_id,
        "data": [d.to_dict() for d in spec.data],
        "loss_fn": spec.loss_fn,
        "loss_fn_config": None if spec.loss_fn_config is None else dict(spec.loss_fn_config),
        "backward": spec.backward,
    }


def _spec(data: Mapping[str, Any]) -> CallSpec:
    return CallSpec(
        data["run_id"],
        [Datum.from_dict(d) for d in data["data"]],
        data["loss_fn"],
        data["loss_fn_config"],
        data["backward"],
    )


def sample_dict(call: SampleCall) -> dict[str, Any]:
    return {
        "source": call.source.to_dict(),
        "prompt_tokens": [int(t) for t in call.prompt_tokens],
        "num_samples": call.num_samples,
        "params": call.params.to_dict(),
        "prompt_logprobs": call.prompt_logprobs,
    }


def _sample_call(data: Mapping[str, Any]) -> SampleCall:
    return SampleCall(
        SampleSource.from_dict(data["source"]),
        data["prompt_tokens"],
        data["num_samples"],
        SamplingParams.from_dict(data["params"]),
        data["prompt_logprobs"],
    )


def apply(engine: Engine, command: Mapping[str, Any]) -> Any:
    """Run one command on this rank's engine (every rank runs the same, in lockstep)."""
    op = command["op"]
    if op == "seed":
        engine._generator.manual_seed(int(command["value"]))
        return None
    if op == "create_run":
        return engine.create_run(
            command["run_id"], command["base_model"], LoraSpec.from_dict(command["lora"])
        )
    if op == "create_run_from_checkpoint":
        return engine.create_run_from_checkpoint(
            command["run_id"], command["path"], command["optimizer"]
        )
    if op == "delete_run":
        return engine.delete_run(command["run_id"])
    if op == "run_calls":
        return engine.run_calls([_spec(c) for c in command["calls"]])
    if op == "forward_backward_many":
        groups = [[Datum.from_dict(d) for d in g] for g in command["groups"]]
        return engine.forward_backward_many(
            command["run_id"],
            groups,
            command["loss_fn"],
            command["loss_fn_config"],
            backward=command["backward"],
        )
    if op == "optim_step":
        return engine.optim_step(command["run_id"], AdamParams.from_dict(command["params"]))
    if op == "sample_many":
        return engine.sample_many([_sample_call(c) for c in command["calls"]])
    if op == "compute_logprobs":
        return engine.compute_logprobs(SampleSource.from_dict(command["source"]), command["tokens"])
    if op == "load_state":
        return engine.load_state(command["run_id"], command["path"], command["optimizer"])
    if op == "restore_run":
        return engine.restore_run(command["run_id"], Path(command["directory"]))
    if op == "forget_checkpoint":
        engine._samplers.forget(Path(command["directory"]))
        return None
    raise ValueError(f"unknown command {op!r}")


def follow(engine: Engine, group: lockstep.Group) -> None:
    """A follower rank's loop: run rank 0's commands until it sends ``stop``.

    A command's ``EZTinkerError`` is rank 0's too (same arguments, same checks): it is dropped
    here. Raises what the collectives raise when rank 0 is gone.
    """
    while True:
        command = receive(group)
        if command["op"] == "stop":
            return
        with lockstep.running(), contextlib.suppress(EZTinkerError):
            apply(engine, command)
