"""One engine over the K ranks of a multi-GPU worker: rank 0 leads, the others follow.

Every rank holds a full ``Engine`` whose bases are sharded over the ranks (``sharding``) and
whose runs (adapters, AdamW state, RNGs) are replicated. ``LeadEngine`` is rank 0's engine (the
one the Celery tasks drive, same ``Backend`` interface as a one-GPU engine): each operation that
touches the model is first sent to the other ranks as a command, then run by every rank with the
same arguments, in lockstep (``lockstep``); ``commands.follow`` is the other ranks' loop. A
command is JSON in a uint8 tensor (its length first), sent with ``torch.distributed.broadcast``:
nothing is pickled between ranks (``commands``). Reads (run info, listings, memory) and
checkpoint writes (every rank holds the same adapter: rank 0 writes) stay on rank 0.

Sampling: every rank decodes the whole batch (the model is sharded, so every rank must take
part in every forward); the ranks take rank 0's sampled tokens and deadline verdicts at each
step (``lockstep.agree``), so their loops stay in step. Continuous batching (``poll``) is off
on a multi-GPU worker: requests that arrive while a batch decodes wait for the next batch.

A rank that dies breaks the worker: ``mark_broken`` (called by the watchdog, ``ranks``) aborts
the collectives in flight and every operation then fails at once with ``WorkerBroken``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from eztinker_tasks.engine import checkpoint_listing, lockstep
from eztinker_tasks.engine.checkpoints import Captured
from eztinker_tasks.engine.commands import apply, sample_dict, send, spec_dict
from eztinker_tasks.engine.engine import Engine
from eztinker_tasks.engine.runs import checked_lora_spec
from eztinker_tasks.errors import EZTinkerError, InternalError
from eztinker_tasks.types import (
    AdamParams,
    CallSpec,
    CheckpointInfo,
    Datum,
    ForwardBackwardOutput,
    LoraSpec,
    ModelInfo,
    OptimStepOutput,
    ProgressFn,
    RunInfo,
    SampleCall,
    SampleOutput,
    SampleSource,
    SamplingParams,
)

log = logging.getLogger(__name__)


WATCHDOG_GRACE_S = 1.0  # how long a failed collective waits for the watchdog's diagnosis


class WorkerBroken(InternalError):
    """A rank of this multi-GPU worker died: no operation can run on it any more."""


# --------------------------------------------------------------------------- rank 0


class LeadEngine:
    """Rank 0's engine: the ``Backend`` the tasks drive, run on every rank in lockstep."""

    def __init__(self, engine: Engine, group: lockstep.Group) -> None:
        self.engine = engine
        self.group = group
        self.config = engine.config
        self.broken: str | None = None
        self._command({"op": "seed", "value": secrets.randbits(62)})

    # -------------------------------------------------------------- lockstep

    def mark_broken(self, why: str) -> None:
        """A rank is gone: fail what runs now and every later operation (``WorkerBroken``)."""
        if self.broken is None:
            self.broken = why
            log.error("multi-GPU worker broken: %s", why)
            _abort_collectives()

    def _error(self) -> WorkerBroken:
        return WorkerBroken(
            f"this multi-GPU worker ({self.group.world} ranks) is broken: {self.broken}; "
            "restart it (eztinker worker --gpus ...); its runs' in-memory state is lost"
        )

    def _command(self, command: Mapping[str, Any], local: Callable[[], Any] | None = None) -> Any:
        """Send ``command`` to the other ranks, then run it here (``local``: this rank's way)."""
        if self.broken is not None:
            raise self._error()
        try:
            with lockstep.running():
                send(command, self.group)
                result = local() if local is not None else apply(self.engine, command)
        except EZTinkerError:
            if self.broken is not None:
                raise self._error() from None
            raise
        except Exception as exc:
            if self.broken is None and _collective_error(exc):
                deadline = time.monotonic() + WATCHDOG_GRACE_S
                while self.broken is None and time.monotonic() < deadline:
                    time.sleep(0.05)  # the watchdog names the rank that died, if one did
            # Anything else that escapes an operation half-way leaves the ranks out of step.
            self.mark_broken(self.broken or f"rank 0 failed in {command['op']}: {exc!r}")
            raise self._error() from exc
        if self.broken is not None:  # aborted collectives may have returned garbage
            raise self._error()
        return result

    # -------------------------------------------------------------- reads: rank 0 alone

    @property
    def device(self) -> str:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    def list_models(self) -> list[ModelInfo]:
        return self.engine.list_models()

    def model_info(self, base_model: str) -> ModelInfo:
        return self.engine.model_info(base_model)

    def has_run(self, run_id: str) -> bool:
        return self.engine.has_run(run_id)

    def list_runs(self) -> list[str]:
        return self.engine.list_runs()

    def run_info(self, run_id: str) -> RunInfo:
        return self.engine.run_info(run_id)

    def peers(self, run_id: str) -> list[str]:
        return self.engine.peers(run_id)

    def list_checkpoints(self, run_id: str | None = None) -> list[CheckpointInfo]:
        return self.engine.list_checkpoints(run_id)

    def memory_stats(self) -> dict[str, int]:
        stats = self.engine.memory_stats()
        stats["ranks"] = self.group.world
        return stats

    # -------------------------------------------------------------- writes: rank 0 alone

    def save_state(self, run_id: str, name: str) -> CheckpointInfo:
        self._check()
        return self.engine.save_state(run_id, name)

    def save_weights_for_sampler(self, run_id: str, name: str) -> CheckpointInfo:
        self._check()
        return self.engine.save_weights_for_sampler(run_id, name)

    def capture_state(self, run_id: str) -> Captured:
        self._check()
        return self.engine.capture_state(run_id)

    def _check(self) -> None:
        if self.broken is not None:
            raise self._error()

    # -------------------------------------------------------------- every rank

    def create_run(self, run_id: str, base_model: str, lora: LoraSpec) -> RunInfo:
        spec = checked_lora_spec(lora)  # the seed drawn here, once, for every rank
        return self._command(
            {"op": "create_run", "run_id": run_id, "base_model": base_model, "lora": spec.to_dict()}
        )

    def create_run_from_checkpoint(self, run_id: str, path: str, optimizer: bool = True) -> RunInfo:
        return self._command(
            {
                "op": "create_run_from_checkpoint",
                "run_id": run_id,
                "path": path,
                "optimizer": optimizer,
            }
        )

    def delete_run(self, run_id: str) -> None:
        self._command({"op": "delete_run", "run_id": run_id})

    def forward_backward(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
    ) -> ForwardBackwardOutput:
        return self.forward_backward_many(run_id, [data], loss_fn, loss_fn_config)[0]

    def forward(
        self,
        run_id: str,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
    ) -> ForwardBackwardOutput:
        return self.forward_backward_many(run_id, [data], loss_fn, loss_fn_config, backward=False)[
            0
        ]

    def forward_backward_many(
        self,
        run_id: str,
        groups: Sequence[Sequence[Datum]],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        backward: bool = True,
        progress: ProgressFn | None = None,
    ) -> list[ForwardBackwardOutput]:
        command = {
            "op": "forward_backward_many",
            "run_id": run_id,
            "groups": [[d.to_dict() for d in g] for g in groups],
            "loss_fn": loss_fn,
            "loss_fn_config": None if loss_fn_config is None else dict(loss_fn_config),
            "backward": backward,
        }
        return self._command(
            command,
            lambda: self.engine.forward_backward_many(
                run_id, groups, loss_fn, loss_fn_config, backward=backward, progress=progress
            ),
        )

    def run_calls(
        self, calls: Sequence[CallSpec], progress: ProgressFn | None = None
    ) -> list[ForwardBackwardOutput | EZTinkerError]:
        command = {"op": "run_calls", "calls": [spec_dict(c) for c in calls]}
        return self._command(command, lambda: self.engine.run_calls(calls, progress=progress))

    def optim_step(self, run_id: str, params: AdamParams) -> OptimStepOutput:
        return self._command({"op": "optim_step", "run_id": run_id, "params": params.to_dict()})

    def sample(
        self,
        source: SampleSource,
        prompt_tokens: Sequence[int],
        num_samples: int,
        params: SamplingParams,
        prompt_logprobs: bool = False,
        progress: ProgressFn | None = None,
    ) -> SampleOutput:
        call = SampleCall(source, prompt_tokens, num_samples, params, prompt_logprobs, progress)
        [out] = self.sample_many([call])
        if isinstance(out, EZTinkerError):
            raise out
        return out

    def sample_many(
        self,
        calls: Sequence[SampleCall],
        *,
        poll: Callable[[], Sequence[SampleCall]] | None = None,
        on_done: Callable[[int, SampleOutput | EZTinkerError], None] | None = None,
    ) -> list[SampleOutput | EZTinkerError]:
        """As ``Engine.sample_many``, without continuous batching (``poll`` is not asked)."""
        del poll  # the other ranks cannot see the queue: no request joins a running batch
        command = {"op": "sample_many", "calls": [sample_dict(c) for c in calls]}
        return self._command(command, lambda: self.engine.sample_many(calls, on_done=on_done))

    def compute_logprobs(self, source: SampleSource, tokens: Sequence[int]) -> list[float | None]:
        command = {
            "op": "compute_logprobs",
            "source": source.to_dict(),
            "tokens": [int(t) for t in tokens],
        }
        return self._command(command)

    def load_state(self, run_id: str, path: str, optimizer: bool = True) -> RunInfo:
        return self._command(
            {"op": "load_state", "run_id": run_id, "path": path, "optimizer": optimizer}
        )

    def restore_run(self, run_id: str, directory: Path) -> RunInfo:
        return self._command({"op": "restore_run", "run_id": run_id, "directory": str(directory)})

    def delete_checkpoint(self, path: str) -> None:
        self._check()
        directory = checkpoint_listing.delete(self.engine._ckpt_dir, path)
        self._command(
            {"op": "forget_checkpoint", "directory": str(directory)},
        )

    def stop(self) -> None:
        """Tell the other ranks to leave their loops (a clean shutdown)."""
        if self.broken is None:
            with lockstep.running():
                send({"op": "stop"}, self.group)


def _collective_error(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in (exc, exc.__cause__) if e is not None}
    text = str(exc)
    return bool(names & {"DistBackendError", "DistError", "DistNetworkError"}) or any(
        s in text for s in ("Connection closed by peer", "Connection reset", "NCCL", "Gloo")
    )


def _abort_collectives() -> None:
    """Unblock a collective waiting for a dead rank (NCCL waits for minutes otherwise)."""
    try:
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()
    except Exception as exc:  # gloo fails by itself when the peer's socket closes
        log.debug("abort of the process group: %s", exc)
