"""The guard that keeps NaN and inf out of a run's gradients and weights.

A ``forward_backward`` back-propagates into FRESH gradient buffers (``GradientStash``): the
gradient accumulated by earlier calls is set aside first. Only when the new loss and gradient are
all finite are the two added; otherwise the earlier gradient is put back untouched and the call
fails with ``NonFiniteValue`` (a ``user`` error) naming the datum and position where the
arithmetic broke (``describe_non_finite``). ``optim_step`` refuses a non-finite gradient the
same way (``check_finite_norm``). So no non-finite value can reach the weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from eztinker_tasks.errors import NonFiniteValue


class GradientStash:
    """Set aside the gradients of ``params`` so that a backward pass writes fresh ones.

    ``finite_flag()`` is a 0-dim bool tensor on the device (no host sync): True when every
    fresh gradient is finite. ``commit()`` adds the set-aside gradients back (the normal
    accumulation); ``rollback()`` drops the fresh ones and restores the set-aside ones exactly.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self._params = list(params)
        self._saved = [p.grad for p in self._params]
        for p in self._params:
            p.grad = None

    def finite_flag(self) -> torch.Tensor | None:
        fresh = [p.grad for p in self._params if p.grad is not None]
        if not fresh:
            return None
        # One fused kernel for the norms; a norm is finite iff every element is (and it
        # overflows float32 for gradients whose square sums do, which AdamW could not use).
        norms = torch._foreach_norm(fresh)
        return torch.stack(norms).isfinite().all()

    def commit(self) -> None:
        add_to: list[torch.Tensor] = []
        add_from: list[torch.Tensor] = []
        for p, saved in zip(self._params, self._saved, strict=True):
            if saved is None:
                continue
            if p.grad is None:
                p.grad = saved
            else:
                add_to.append(saved)
                add_from.append(p.grad)
                p.grad = saved
        if add_to:
            torch._foreach_add_(add_to, add_from)

    def rollback(self) -> None:
        for p, saved in zip(self._params, self._saved, strict=True):
            p.grad = saved


def check_finite_norm(total: torch.Tensor | None, what: str) -> None:
    """Raise ``NonFiniteValue`` if the gradient norm ``total`` (a 0-dim tensor) is NaN/inf."""
    if total is not None and not bool(torch.isfinite(total)):
        raise NonFiniteValue(
            f"{what}: the accumulated gradient is not finite (norm {float(total)}); the step was "
            "refused and nothing changed",
            errors={"gradient": ["not finite"]},
        )


def _first_bad(rows: np.ndarray, lengths: Sequence[int]) -> tuple[int, int] | None:
    for row, n in enumerate(lengths):
        bad = ~np.isfinite(rows[row, :n])
        if bad.any():
            return row, int(np.argmax(bad))
    return None


def describe_non_finite(
    op: str,
    loss_fn: str,
    lengths: Sequence[int],
    group_starts: Sequence[int],
    elementwise: np.ndarray,
    lp: np.ndarray,
    lp_grad: np.ndarray | None,
    inputs: Mapping[str, np.ndarray],
    loss_finite: bool,
) -> NonFiniteValue:
    """The error for a pass whose loss or gradient was not finite, naming datum and position.

    ``elementwise``, ``lp`` and ``lp_grad`` (d loss / d lp) are [B, T] host arrays of the pass;
    ``group_starts`` are the first rows of the coalesced calls (datum indices restart per call).
    """
    where = _first_bad(elementwise, lengths)
    kind = "loss"
    if where is None and lp_grad is not None:
        where = _first_bad(lp_grad, lengths)
        kind = "gradient of the loss"
    if where is None and not loss_finite:
        return NonFiniteValue(
            f"{op} ({loss_fn}): the loss sums to a value beyond float32's range although every "
            "token's loss is finite (weights or advantages too large); nothing was applied: the "
            "accumulated gradient is as it was before this call",
            errors={"loss": ["not finite"]},
        )
    if where is None:
        largest = ", ".join(
            f"largest |{key}| {_fmt(float(np.abs(values).max()))}"
            for key, values in sorted(inputs.items())
            if values.size
        )
        return NonFiniteValue(
            f"{op} ({loss_fn}): the gradient overflows float32 inside the model although the "
            "loss is finite (loss inputs too large, "
            + (f"{largest}, " if largest else "")
            + "or activations that overflow); nothing was applied: the accumulated gradient is "
            "as it was before this call",
            errors={"gradient": ["not finite"]},
        )
    row, pos = where
    start = max(s for s in group_starts if s <= row)
    datum = row - start
    values = {"learner logprob": float(lp[row, pos])}
    values.update({k: float(v[row, pos]) for k, v in sorted(inputs.items())})
    shown = ", ".join(f"{k} {_fmt(v)}" for k, v in values.items())
    return NonFiniteValue(
        f"{op} ({loss_fn}): the {kind} is not finite at data[{datum}] position {pos} ({shown}); "
        "nothing was applied: the accumulated gradient is as it was before this call",
        errors={f"data[{datum}]": [f"non-finite {kind} at position {pos}"]},
    )


def _fmt(value: float) -> str:
    return repr(value) if not math.isfinite(value) else f"{value:.6g}"
