"""Datum validation and right-padding into one batch of tensors.

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


@dataclass
class Batch:
    """A right-padded batch. ``attention_mask`` is None when every row has the same length."""

    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor | None  # [B, T] int64 or None
    targets: torch.Tensor  # [B, T] int64, 0 at padding
    mask: torch.Tensor  # [B, T] bool, True at real positions
    inputs: dict[str, torch.Tensor]  # every loss input but the targets, [B, T] float32
    lengths: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)


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


def build_batch(
    data: Sequence[Datum],
    spec: LossSpec,
    vocab_size: int,
    max_context: int,
    device: torch.device,
) -> Batch:
    """Validate ``data`` for loss ``spec`` and pad it into tensors on ``device``."""
    if not isinstance(data, Sequence) or isinstance(data, (str, bytes)) or len(data) == 0:
        raise _invalid("data must be a non-empty list of datums", "data")
    rows: list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = []
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
        rows.append((tokens, targets, floats))

    lengths = [len(tokens) for tokens, _, _ in rows]
    batch, width = len(rows), max(lengths)
    input_ids = np.zeros((batch, width), dtype=np.int64)
    targets = np.zeros((batch, width), dtype=np.int64)
    mask = np.zeros((batch, width), dtype=np.bool_)
    keys = sorted({key for _, _, floats in rows for key in floats})
    inputs = {key: np.zeros((batch, width), dtype=np.float32) for key in keys}
    for b, (tok, tgt, floats) in enumerate(rows):
        n = len(tok)
        input_ids[b, :n] = tok
        targets[b, :n] = tgt
        mask[b, :n] = True
        for key, values in floats.items():
            inputs[key][b, :n] = values
    # Optional inputs absent from some datums keep their neutral default there.
    for key in keys:
        if key == "weights":
            for b, (_, _, floats) in enumerate(rows):
                if key not in floats:
                    inputs[key][b, : lengths[b]] = 1.0

    def to_device(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(device, non_blocking=True)

    uniform = all(n == width for n in lengths)
    return Batch(
        input_ids=to_device(input_ids),
        attention_mask=None if uniform else to_device(mask.astype(np.int64)),
        targets=to_device(targets),
        mask=to_device(mask),
        inputs={key: to_device(value) for key, value in inputs.items()},
        lengths=lengths,
    )
