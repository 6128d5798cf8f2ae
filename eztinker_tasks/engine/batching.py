"""Datum validation, and packing of validated datums into one row without padding.

Everything a request can get wrong is checked here, before any model state is touched: empty
batch, missing or unknown loss inputs, length mismatches, token ids outside the vocabulary,
sequences longer than the context, NaN/inf in float inputs. Errors are ``InvalidRequest`` and
name the datum and the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from eztinker_tasks.errors import InvalidRequest
from eztinker_tasks.loss_specs import LossSpec, bounds_message, check_loss_inputs, input_bounds
from eztinker_tasks.types import Datum

TARGET_KEY = "target_tokens"


def _invalid(message: str, where: str) -> InvalidRequest:
    return InvalidRequest(message, errors={where: [message]})


def token_array(values: Any, vocab_size: int, where: str) -> np.ndarray:
    """Validate a flat sequence of token ids (integers in ``[0, vocab_size)``) as int64."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise _invalid(f"{where} must be a flat list of integers", where) from None
    if array.ndim != 1:
        raise _invalid(f"{where} must be a flat list of integers", where)
    if not np.all(np.isfinite(array)) or np.any(array != np.floor(array)):
        raise _invalid(f"{where} must hold integers only", where)
    bad = (array < 0) | (array >= vocab_size)
    if np.any(bad):
        index = int(np.argmax(bad))
        raise _invalid(
            f"{where}[{index}] = {int(array[index])} is outside the vocabulary [0, {vocab_size})",
            where,
        )
    return array.astype(np.int64)


def float_array(values: Any, where: str, key: str = "") -> np.ndarray:
    """Validate a flat sequence of numbers as float32 within ``input_bounds(key)``.

    NaN, inf, values beyond float32's range and (for ``logprobs``) log-probabilities above 0
    are refused with an ``InvalidRequest`` naming the index.
    """
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise _invalid(f"{where} must be a flat list of numbers", where) from None
    if array.ndim != 1:
        raise _invalid(f"{where} must be a flat list of numbers", where)
    lo, hi = input_bounds(key)
    bad = ~((array >= lo) & (array <= hi))
    if np.any(bad):
        index = int(np.argmax(bad))
        message = bounds_message(key or "values", index, float(array[index]))
        raise _invalid(f"{where}: {message}", where)
    return array.astype(np.float32)


def check_length(length: int, max_context: int, where: str) -> None:
    if length == 0:
        raise _invalid(f"{where} is empty", where)
    if length > max_context:
        raise _invalid(
            f"{where} has {length} tokens, more than the model's context of {max_context}", where
        )


@dataclass(frozen=True)
class Row:
    """One validated datum: input tokens, targets and float loss inputs (same length)."""

    tokens: np.ndarray  # int64
    targets: np.ndarray  # int64
    floats: dict[str, np.ndarray]  # float32 each


def validate_rows(
    data: Sequence[Datum], spec: LossSpec, vocab_size: int, max_context: int
) -> list[Row]:
    """Validate ``data`` for loss ``spec``; raise ``InvalidRequest`` naming datum and field."""
    if not isinstance(data, Sequence) or isinstance(data, (str, bytes)) or len(data) == 0:
        raise _invalid("data must be a non-empty list of datums", "data")
    rows: list[Row] = []
    for i, datum in enumerate(data):
        if not isinstance(datum, Datum):
            raise _invalid(f"data[{i}] is not a Datum", f"data[{i}]")
        tokens = token_array(datum.tokens, vocab_size, f"data[{i}].tokens")
        check_length(len(tokens), max_context, f"data[{i}].tokens")
        check_loss_inputs(spec, set(datum.loss_fn_inputs))
        targets = np.zeros(0, dtype=np.int64)
        floats: dict[str, np.ndarray] = {}
        for key, values in datum.loss_fn_inputs.items():
            where = f"data[{i}].loss_fn_inputs.{key}"
            if key == TARGET_KEY:
                targets = token_array(values, vocab_size, where)
                array = targets
            else:
                array = floats[key] = float_array(values, where, key)
            if len(array) != len(tokens):
                raise _invalid(
                    f"{where} has length {len(array)} but tokens has length {len(tokens)}", where
                )
        rows.append(Row(tokens, targets, floats))
    return rows


# The value an input takes where a datum does not give it: the loss then behaves as without it.
NEUTRAL = {"weights": 1.0}


@dataclass
class PackedBatch:
    """Sequences concatenated without padding into one row of ``num_tokens`` positions.

    Positions restart at 0 for every sequence; ``cu_seqlens`` ([S + 1] int32 on the device)
    are the cumulative sequence lengths that packed attention uses to keep sequences apart.
    """

    input_ids: torch.Tensor  # [1, N] int64
    position_ids: torch.Tensor  # [1, N] int64
    targets: torch.Tensor  # [N] int64
    cu_seqlens: torch.Tensor  # [S + 1] int32
    inputs: dict[str, torch.Tensor]  # every float loss input, [N] float32 (neutral where absent)
    lengths: list[int]
    starts: list[int]  # first position of each sequence

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths)


def pack(rows: Sequence[Row], device: torch.device) -> PackedBatch:
    """Concatenate validated rows (in order) into one packed batch on ``device``."""
    lengths = [len(r.tokens) for r in rows]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    keys = sorted({key for r in rows for key in r.floats})
    inputs = {}
    for key in keys:
        inputs[key] = np.concatenate(
            [
                r.floats[key]
                if key in r.floats
                else np.full(len(r.tokens), NEUTRAL.get(key, 0.0), dtype=np.float32)
                for r in rows
            ]
        )
    positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])

    def to_device(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True)

    return PackedBatch(
        input_ids=to_device(np.concatenate([r.tokens for r in rows]))[None],
        position_ids=to_device(positions)[None],
        targets=to_device(np.concatenate([r.targets for r in rows])),
        cu_seqlens=to_device(starts.astype(np.int32)),
        inputs={key: to_device(value) for key, value in inputs.items()},
        lengths=lengths,
        starts=starts[:-1].tolist(),
    )
