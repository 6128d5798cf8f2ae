"""The Tinker-named types: construction, conversion, JSON shapes. No server needed."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from eztinker import errors, types
from tests.conftest import REPO


def test_model_input_roundtrip() -> None:
    mi = types.ModelInput.from_ints(np.array([3, 4, 5]))
    assert mi.to_ints() == [3, 4, 5] and mi.length == 3
    longer = mi.append_int(6).append(types.EncodedTextChunk([7, 8]))
    assert longer.to_ints() == [3, 4, 5, 6, 7, 8] and longer.length == 6
    assert mi.length == 3  # append returns a new ModelInput
    assert types.ModelInput.empty().length == 0
    assert longer.to_json() == {"tokens": [3, 4, 5, 6, 7, 8]}
    assert all(type(t) is int for t in longer.to_ints())


def test_tensor_data_from_numpy_lists_and_back() -> None:
    td = types.TensorData.from_numpy(np.arange(6, dtype=np.int32).reshape(2, 3))
    assert td.dtype == "int64" and td.shape == [2, 3] and td.data == [0, 1, 2, 3, 4, 5]
    assert td.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert td.to_numpy().shape == (2, 3) and td.to_numpy().dtype == np.int64
    floats = types.TensorData.from_list([0.5, 1, 2])
    assert floats.dtype == "float32" and floats.tolist() == [0.5, 1.0, 2.0]
    ints = types.TensorData.from_list([1, 2, 3])
    assert ints.dtype == "int64" and ints.to_json() == [1, 2, 3]
    assert len(ints) == 3
    with pytest.raises(TypeError):
        types.TensorData.coerce("not a tensor")  # ty: ignore[invalid-argument-type]


class FakeTorchTensor:
    """Enough of torch.Tensor for duck typing (torch is never imported by the client)."""

    def __init__(self, values: list[float], dtype: str) -> None:
        self._values = np.asarray(values)
        self.dtype = dtype
        self.shape = self._values.shape

    def detach(self) -> FakeTorchTensor:
        return self

    def cpu(self) -> FakeTorchTensor:
        return self

    def reshape(self, *shape: int) -> FakeTorchTensor:
        out = FakeTorchTensor([], self.dtype)
        out._values = self._values.reshape(*shape)
        out.shape = out._values.shape
        return out

    def tolist(self) -> list[float]:
        return self._values.tolist()


def test_datum_accepts_lists_numpy_and_torch_like_tensors() -> None:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": FakeTorchTensor([2, 3, 4], "torch.int64"),
            "weights": np.array([0.0, 1.0, 1.0], dtype=np.float32),
            "advantages": [0.5, -1, 2],
        },
    )
    assert isinstance(datum.loss_fn_inputs["target_tokens"], types.TensorData)
    assert datum.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert datum.to_json() == {
        "model_input": {"tokens": [1, 2, 3]},
        "loss_fn_inputs": {
            "target_tokens": [2, 3, 4],
            "weights": [0.0, 1.0, 1.0],
            "advantages": [0.5, -1.0, 2.0],
        },
    }
    # A plain token list is accepted for model_input too.
    assert types.Datum([1, 2], {"target_tokens": [2, 3]}).model_input.to_ints() == [1, 2]


def test_params_serialise_like_the_api_expects() -> None:
    adam = types.AdamParams(learning_rate=1e-3, weight_decay=0.01)
    assert adam.to_json() == {
        "learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12,
        "weight_decay": 0.01, "grad_clip_norm": 0.0,
    }  # fmt: skip
    sp = types.SamplingParams(max_tokens=8, temperature=0.0, stop=["\n", 0], seed=3)
    assert sp.to_json() == {
        "temperature": 0.0, "top_k": -1, "top_p": 1.0, "max_tokens": 8, "seed": 3,
        "stop": ["\n", 0],
    }  # fmt: skip
    assert "max_tokens" not in types.SamplingParams().to_json()


def test_outputs_parse_server_json() -> None:
    fb = types.ForwardBackwardOutput.from_json(
        {
            "loss_fn_outputs": [{"logprobs": [-1.0, -2.0], "elementwise_loss": [1.0, 2.0]}],
            "metrics": {"loss:sum": 3.0},
        }
    )
    assert fb.metrics["loss:sum"] == 3.0
    assert fb.loss_fn_outputs[0]["logprobs"].tolist() == [-1.0, -2.0]
    assert fb.loss_fn_outputs[0]["elementwise_loss"].to_numpy().sum() == 3.0
    sample = types.SampleResponse.from_json(
        {
            "sequences": [
                {"tokens": [1], "logprobs": [-0.1], "stop_reason": "length", "text": "a"}
            ],
            "prompt_logprobs": None,
            "extra": "ignored",
        }
    )
    assert sample.sequences[0].stop_reason == "length" and sample.sequences[0].text == "a"
    saved = types.SaveWeightsResponse.from_json(
        {"path": "run_x/ck", "run_id": "run_x", "name": "ck", "kind": "state", "step": 3,
         "base_model": "tiny-gpt2", "created_at": 1.0, "size_bytes": 10, "directory": "/d"}
    )  # fmt: skip
    assert saved.path == "run_x/ck" and saved.checkpoint and saved.checkpoint.step == 3
    info = types.RunInfo.from_json(
        {"run_id": "run_x", "base_model": "m", "lora": {"rank": 4}, "step": 2, "checkpoints": []}
    )
    assert info.model_id == "run_x" and info.lora_rank == 4 and info.step == 2


def test_error_envelopes_map_to_typed_errors() -> None:
    err = errors.from_envelope(
        {"code": "invalid_request", "status": 400, "category": "user", "message": "bad token"},
        400,
    )
    assert isinstance(err, errors.BadRequestError)
    assert (err.category, err.code, err.status, str(err)) == (
        "user",
        "invalid_request",
        400,
        "bad token",
    )
    # A failed future's error has no HTTP status: it is derived from the code.
    lost = errors.from_envelope(
        {"code": "unknown_run", "category": "user", "message": "gone"}, future_id="fut_1"
    )
    assert isinstance(lost, errors.NotFoundError) and lost.status == 404
    assert lost.future_id == "fut_1"
    crash = errors.from_envelope({"code": "internal", "category": "server", "message": "boom"})
    assert isinstance(crash, errors.InternalServerError) and crash.category == "server"
    assert errors.from_envelope("plain text", 502).message == "plain text"


def test_importing_the_client_does_not_import_torch() -> None:
    code = (
        "import sys, eztinker, eztinker.cli\n"
        "from eztinker import types\n"
        "bad = [m for m in ('torch', 'transformers', 'celery', 'flask') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
