"""Marshmallow fields for token lists and tensors: validated in one pass, documented as arrays.

A training request can hold tens of thousands of numbers; validating them element by element
through nested marshmallow fields costs milliseconds, so these fields check the whole list at
once while still showing up in the OpenAPI spec as arrays of integers / numbers.
"""

from __future__ import annotations

import math
from typing import Any

from marshmallow import ValidationError, fields


def _is_int(x: Any) -> bool:
    return type(x) is int


class IntList(fields.List[int]):
    """A list of integers (bools and floats rejected)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(fields.Integer(), **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> list[int | None]:
        if not isinstance(value, list):
            raise ValidationError("must be a list of integers")
        if not all(map(_is_int, value)):
            bad = next(x for x in value if not _is_int(x))
            raise ValidationError(f"must be a list of integers; got {bad!r}")
        return value


def _finite_floats(value: Any) -> list[float | None]:
    if not isinstance(value, list):
        raise ValidationError("must be a list of numbers")
    out: list[float | None] = []
    for x in value:
        if type(x) not in (int, float):
            raise ValidationError(f"must be a list of numbers; got {x!r}")
        if not math.isfinite(x):
            raise ValidationError(f"must hold finite numbers only; got {x!r}")
        out.append(float(x))
    return out


class TensorField(fields.List[float]):
    """A flat list of finite numbers, or Tinker's TensorData ``{"data", "dtype", "shape"}``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(fields.Float(), **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> list[float | None]:
        if isinstance(value, dict):
            if "data" not in value:
                raise ValidationError("TensorData needs a 'data' list")
            shape = value.get("shape")
            values = _finite_floats(value["data"])
            if shape is not None and (
                not isinstance(shape, list) or math.prod(shape) != len(values) or len(shape) > 1
            ):
                raise ValidationError("TensorData must be one-dimensional with matching shape")
            return values
        return _finite_floats(value)


class FiniteFloat(fields.Float):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_nan=False, **kwargs)
