"""Marshmallow fields for request bodies: JSON types taken as the spec says, nothing coerced.

marshmallow's own fields convert: ``Boolean`` takes ``1``, ``"yes"`` or ``"on"``, ``Integer``
takes ``true``, ``Float`` takes ``"1.5"``. The spec documents JSON booleans, integers and
numbers, so a request field uses ``JsonBoolean``, ``JsonInteger`` or ``FiniteFloat``, which take
exactly those (422 for anything else).

A training request can hold tens of thousands of numbers; validating them element by element
through nested marshmallow fields costs milliseconds, so the list fields check the whole list
at once while still showing up in the OpenAPI spec as arrays of integers / numbers.
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
        try:
            number = float(x)  # an integer beyond float's range overflows
        except OverflowError:
            raise ValidationError("must hold finite numbers only; got a huge integer") from None
        if not math.isfinite(number):
            raise ValidationError(f"must hold finite numbers only; got {x!r}")
        out.append(number)
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
    """A finite JSON number (an integer counts; a string or a bool does not)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_nan=False, **kwargs)

    def _validated(self, value: Any) -> float:
        if type(value) not in (int, float):
            raise self.make_error("invalid", input=value)
        return super()._validated(value)


class JsonInteger(fields.Integer):
    """A JSON integer (not a bool, a float or a string)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _validated(self, value: Any) -> int:
        if type(value) is not int:
            raise self.make_error("invalid", input=value)
        return super()._validated(value)


class JsonBoolean(fields.Boolean):
    """``true`` or ``false`` (not ``1``, ``"yes"``, ``"on"``, ...)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> bool:
        if type(value) is not bool:
            raise self.make_error("invalid", input=value)
        return value
