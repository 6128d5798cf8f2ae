"""Tinker's protobuf messages, read and written with the SDK's own generated module.

The module (``tinker/proto/tinker_public_pb2.py``) is loaded from the installed ``tinker``
distribution's file, without importing the ``tinker`` package itself (httpx, pydantic, ...):
it needs only ``google.protobuf``. It is loaded on first use, so the web app starts without it.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from types import ModuleType
from typing import Any

import numpy as np

from eztinker_tasks.errors import InvalidRequest, ServiceUnavailable

PROTO_TYPE = "application/x-protobuf"
_MODULE = "tinker.proto.tinker_public_pb2"
_REDUCTIONS = {"mean", "sum", "min", "max", "slack", "hash2", "unique"}


@cache
def pb() -> ModuleType:
    """The generated ``tinker_public`` module (ServiceUnavailable if ``tinker`` is absent)."""
    if _MODULE in sys.modules:
        return sys.modules[_MODULE]
    try:
        path = metadata.distribution("tinker").locate_file("tinker/proto/tinker_public_pb2.py")
    except metadata.PackageNotFoundError:
        raise ServiceUnavailable(
            "the server cannot read Tinker's protobuf messages: install the 'tinker' package"
        ) from None
    spec = importlib.util.spec_from_file_location(_MODULE, str(path))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Under its own name: a later ``import tinker`` in this process reuses it instead of
    # registering the same protobuf descriptors twice (which protobuf refuses).
    sys.modules[_MODULE] = module
    return module


@dataclass(frozen=True)
class ForwardBackwardCall:
    """A decoded ``ForwardBackwardRequest``: datums as ``/v1`` JSON, the loss and its config."""

    model_id: str
    seq_id: int
    data: list[dict[str, Any]]
    loss_fn: str
    loss_fn_config: dict[str, float] | None
    forward_only: bool


def _tensor(tensor: Any, name: str) -> list[Any]:
    m = pb()
    if tensor.WhichOneof("encoding") != "dense":
        raise InvalidRequest(
            f"loss_fn_inputs[{name!r}]: only dense tensors are supported",
            errors={"loss_fn_inputs": {name: ["sparse tensors are not supported"]}},
        )
    dtypes = {m.DTYPE_FLOAT32: np.float32, m.DTYPE_INT64: np.int64, m.DTYPE_INT32: np.int32}
    dtype = dtypes.get(tensor.dtype)
    if dtype is None or len(tensor.dense) % np.dtype(dtype).itemsize:
        raise InvalidRequest(
            f"loss_fn_inputs[{name!r}]: unsupported dtype or truncated data",
            errors={"loss_fn_inputs": {name: ["bad tensor"]}},
        )
    if len(tensor.shape) > 1:
        raise InvalidRequest(
            f"loss_fn_inputs[{name!r}]: only 1-D tensors are supported",
            errors={"loss_fn_inputs": {name: ["not 1-D"]}},
        )
    return np.frombuffer(tensor.dense, dtype=dtype).tolist()


def decode_forward_backward(body: bytes) -> ForwardBackwardCall:
    """Parse a ``ForwardBackwardRequest`` body (InvalidRequest if it is not one)."""
    m = pb()
    req = m.ForwardBackwardRequest()
    try:
        req.ParseFromString(body)
    except Exception as exc:  # protobuf's DecodeError
        raise InvalidRequest(
            f"the body is not a ForwardBackwardRequest: {exc}", errors={"body": ["not protobuf"]}
        ) from None
    data = []
    for i, datum in enumerate(req.data):
        tokens: list[int] = []
        for chunk in datum.model_input:
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise InvalidRequest(
                    f"data[{i}]: only encoded_text chunks are supported",
                    errors={"data": {str(i): ["unsupported chunk"]}},
                )
            if len(chunk.encoded_text.tokens) % 4:
                raise InvalidRequest(f"data[{i}]: truncated tokens", errors={"data": {}})
            tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype="<i4").tolist())
        inputs = {k: _tensor(v, k) for k, v in datum.loss_fn_inputs.items()}
        data.append({"model_input": {"tokens": tokens}, "loss_fn_inputs": inputs})
    config = {k: float(v) for k, v in req.loss_fn_config.items()}
    for k, v in req.loss_fn_config_v2.items():
        if v.WhichOneof("value") == "number":
            config[k] = float(v.number)
    return ForwardBackwardCall(
        model_id=req.model_id,
        seq_id=int(req.seq_id),
        data=data,
        loss_fn=req.loss_fn or "cross_entropy",
        loss_fn_config=config or None,
        forward_only=bool(req.forward_only),
    )


def encode_forward_backward(result: dict[str, Any]) -> bytes:
    """A ``/v1`` forward(_backward) result as a serialized ``ForwardBackwardOutput``.

    Metrics keep only ``name:reduction`` keys with a reduction the SDK merges.
    """
    m = pb()
    out = m.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for record in result.get("loss_fn_outputs") or []:
        rec = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=1)
        for key, values in record.items():
            arr = np.asarray(values, dtype="<f4")
            field = rec.fields[key]
            field.data = arr.tobytes()
            field.offsets = np.asarray([0, arr.nbytes], dtype="<i8").tobytes()
            field.dtype = m.DTYPE_FLOAT32
    for key, value in (result.get("metrics") or {}).items():
        parts = key.split(":")
        if len(parts) == 2 and parts[1] in _REDUCTIONS and isinstance(value, int | float):
            out.metrics[key] = float(value)
    return out.SerializeToString()


def encode_sample(result: dict[str, Any], last_n: int | None = None) -> bytes:
    """A ``/v1`` sample result as a serialized ``SampleResponse`` (prompt logprobs: NaN where
    there is none, and before the last ``last_n`` positions when that is given)."""
    m = pb()
    out = m.SampleResponse()
    for seq in result.get("sequences") or []:
        out.sequences.add(
            stop_reason=m.STOP_REASON_STOP
            if seq["stop_reason"] == "stop"
            else m.STOP_REASON_LENGTH,
            tokens=np.asarray(seq["tokens"], dtype="<i4").tobytes(),
            logprobs=np.asarray(seq["logprobs"], dtype="<f4").tobytes(),
        )
    prompt = result.get("prompt_logprobs")
    if prompt is not None:
        values = np.asarray([np.nan if v is None else v for v in prompt], dtype="<f4")
        if last_n is not None:
            values[: max(0, len(values) - last_n)] = np.nan
        out.prompt_logprobs = values.tobytes()
    return out.SerializeToString()
