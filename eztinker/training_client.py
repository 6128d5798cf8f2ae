"""``TrainingClient``: the operations of one LoRA training run.

Every operation returns a future at once. Submitting several without waiting pipelines them:
requests leave in call order (one submit thread per client) and the server runs a run's
operations in arrival order, so

    fb = tc.forward_backward(batch)            # sent
    opt = tc.optim_step(types.AdamParams(learning_rate=1e-4))   # sent, queued behind fb
    loss = fb.result().metrics["loss:sum"]; opt.result()

is one round trip of waiting. Each operation carries a ``seq_id`` numbered by this client
(1, 2, ... for a run it created), so a request retried after a lost response is recognised by
the server and never applied twice. Use one TrainingClient per run: two clients numbering the
same run's operations would collide.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from eztinker.futures import APIFuture, OrderedSubmitter, Submission
from eztinker.sampling_client import SamplingClient
from eztinker.transport import Transport
from eztinker.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LoadWeightsResponse,
    OptimStepResponse,
    RunInfo,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    TensorData,
)

T = TypeVar("T")
CustomLossFn = Callable[[list[Datum], list[Any]], tuple[Any, dict[str, float]]]


def _datum_json(datum: Datum | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(datum, Datum):
        return datum.to_json()
    if isinstance(datum, Mapping) and "model_input" in datum:
        return Datum(datum["model_input"], dict(datum.get("loss_fn_inputs") or {})).to_json()
    raise TypeError(f"expected a types.Datum, got {type(datum).__name__}")


def _grad(tensor: Any) -> Any:
    """d loss / d logprobs of one datum (zeros if the loss does not use that datum)."""
    if tensor.grad is None:
        return tensor.detach().numpy() * 0.0
    return tensor.grad.numpy()


class TrainingClient:
    """Drives one training run (Tinker's ``TrainingClient``)."""

    def __init__(
        self,
        transport: Transport,
        run_id: str,
        base_model: str = "",
        *,
        next_seq_id: int | None = 1,
    ) -> None:
        """``next_seq_id``: the first seq_id to send (1 for a run this client created). None
        for a run created elsewhere: the first operation lets the server number it and later
        ones continue from there."""
        self._transport = transport
        self.run_id = run_id
        self._base_model = base_model
        self._next_seq = next_seq_id
        self._seq_lock = threading.Lock()
        self._submitter = OrderedSubmitter(f"eztinker-{run_id[-8:]}")
        self._tokenizer: Any = None

    @property
    def model_id(self) -> str:
        return self.run_id

    def _take_seq(self) -> int | None:
        with self._seq_lock:
            seq = self._next_seq
            if seq is not None:
                self._next_seq = seq + 1  # consumed even if the submit fails: never reused
            return seq

    def _op(
        self, op: str, body: dict[str, Any], convert: Callable[[Any], T]
    ) -> Submission[APIFuture[T]]:
        """Queue ``POST /v1/runs/<id>/<op>`` behind this client's earlier submissions."""

        def send() -> APIFuture[T]:
            seq = self._take_seq()
            payload = body if seq is None else {**body, "seq_id": seq}
            sent = self._transport.request(
                "POST", f"/v1/runs/{self.run_id}/{op}", json=payload, idempotent=seq is not None
            )
            got = sent.get("seq_id")
            if seq is None and isinstance(got, int):
                with self._seq_lock:
                    if self._next_seq is None:
                        self._next_seq = got + 1
            return APIFuture(
                self._transport, sent["future_id"], convert, op=op, run_id=self.run_id,
                seq_id=got,
            )  # fmt: skip

        return Submission(self._submitter.submit(send))

    # -- forward / backward ---------------------------------------------------------------
    def _forward_body(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: Mapping[str, float] | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"data": [_datum_json(d) for d in data], "loss_fn": loss_fn}
        if loss_fn_config:
            body["loss_fn_config"] = {k: float(v) for k, v in loss_fn_config.items()}
        return body

    def forward_backward_async(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> Submission[APIFuture[ForwardBackwardOutput]]:
        body = self._forward_body(data, loss_fn, loss_fn_config)
        return self._op(
            "forward_backward", body, lambda r: ForwardBackwardOutput.from_json(r, loss_fn)
        )

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Forward + backward on ``data``; gradients accumulate until ``optim_step``."""
        return self.forward_backward_async(data, loss_fn, loss_fn_config).result()

    def forward_async(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> Submission[APIFuture[ForwardBackwardOutput]]:
        body = self._forward_body(data, loss_fn, loss_fn_config)
        return self._op("forward", body, lambda r: ForwardBackwardOutput.from_json(r, loss_fn))

    def forward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """The outputs of ``forward_backward`` with no gradient and no state change."""
        return self.forward_async(data, loss_fn, loss_fn_config).result()

    def forward_backward_custom(
        self, data: Sequence[Datum], loss_fn: CustomLossFn
    ) -> APIFuture[ForwardBackwardOutput]:
        """Train on any differentiable function of the per-token logprobs (needs torch here).

        ``loss_fn(data, logprobs) -> (loss, metrics)`` gets one torch tensor of target-token
        logprobs per datum. This runs ``forward``, computes the loss and its gradient locally,
        then sends a ``forward_backward`` whose weights carry that gradient (so the server
        accumulates exactly d loss / d params). Blocks until the forward pass is done.
        """
        import torch

        data = list(data)
        # The logprobs need only the targets: other inputs (ones the custom loss reads, such as
        # reference logprobs) would be refused by the server's cross_entropy.
        targets = [
            Datum(d.model_input, {"target_tokens": d.loss_fn_inputs["target_tokens"]}) for d in data
        ]
        fwd = self.forward(targets).result()
        logprobs = [
            torch.tensor(out["logprobs"].to_numpy(), dtype=torch.float32, requires_grad=True)
            for out in fwd.loss_fn_outputs
        ]
        loss, metrics = loss_fn(data, logprobs)
        loss.backward()
        linear = [
            Datum(
                d.model_input,
                {
                    "target_tokens": d.loss_fn_inputs["target_tokens"],
                    "weights": TensorData.from_numpy(-_grad(lp)),
                },
            )
            for d, lp in zip(data, logprobs, strict=True)
        ]
        custom = {**{k: float(v) for k, v in metrics.items()}, "loss:sum": float(loss.item())}

        def convert(result: Any) -> ForwardBackwardOutput:
            return ForwardBackwardOutput(fwd.loss_fn_outputs, custom, "custom")

        return self._op("forward_backward", self._forward_body(linear, "cross_entropy", None),
                        convert).result()  # fmt: skip

    # -- optimizer -------------------------------------------------------------------------
    def optim_step_async(
        self, adam_params: AdamParams | None = None
    ) -> Submission[APIFuture[OptimStepResponse]]:
        body = {"adam_params": (adam_params or AdamParams()).to_json()}
        return self._op("optim_step", body, OptimStepResponse.from_json)

    def optim_step(self, adam_params: AdamParams | None = None) -> APIFuture[OptimStepResponse]:
        """One AdamW step on the accumulated gradients (which are then zeroed)."""
        return self.optim_step_async(adam_params).result()

    # -- checkpoints -----------------------------------------------------------------------
    def save_state_async(self, name: str) -> Submission[APIFuture[SaveWeightsResponse]]:
        return self._op("save", {"name": name, "kind": "state"}, SaveWeightsResponse.from_json)

    def save_state(self, name: str) -> APIFuture[SaveWeightsResponse]:
        """Save adapter + optimizer state (resumable); the result's ``.path`` loads it back."""
        return self.save_state_async(name).result()

    def save_weights_for_sampler_async(
        self, name: str
    ) -> Submission[APIFuture[SaveWeightsForSamplerResponse]]:
        return self._op(
            "save", {"name": name, "kind": "sampler"}, SaveWeightsForSamplerResponse.from_json
        )

    def save_weights_for_sampler(self, name: str) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Save the adapter for sampling (a PEFT adapter directory); ``.path`` to sample it."""
        return self.save_weights_for_sampler_async(name).result()

    def _load(self, path: str, optimizer: bool) -> Submission[APIFuture[LoadWeightsResponse]]:
        def convert(r: Any) -> LoadWeightsResponse:
            return LoadWeightsResponse(path, int((r or {}).get("step", 0)))

        return self._op("load", {"path": path, "optimizer": optimizer}, convert)

    def load_state_async(self, path: str) -> Submission[APIFuture[LoadWeightsResponse]]:
        return self._load(path, False)

    def load_state(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Load a saved state's weights into this run (the optimizer state is reset)."""
        return self._load(path, False).result()

    def load_state_with_optimizer_async(
        self, path: str
    ) -> Submission[APIFuture[LoadWeightsResponse]]:
        return self._load(path, True)

    def load_state_with_optimizer(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Load a saved state's weights and optimizer state (to resume training exactly)."""
        return self._load(path, True).result()

    # -- sampling --------------------------------------------------------------------------
    def create_sampling_client(self, model_path: str | None = None) -> SamplingClient:
        """Sample this run's live weights (queued behind its earlier operations), or the
        checkpoint ``model_path``."""
        if model_path:
            return SamplingClient(self._transport, model_path=model_path)
        return SamplingClient(self._transport, run_id=self.run_id, submitter=self._submitter)

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> SamplingClient:
        """Save the weights for sampling (waits for the save) and return a client for them."""
        saved = self.save_weights_for_sampler(name or f"sampler-{uuid.uuid4().hex[:8]}").result()
        return SamplingClient(self._transport, model_path=saved.path)

    async def save_weights_and_get_sampling_client_async(
        self, name: str | None = None
    ) -> SamplingClient:
        future = await self.save_weights_for_sampler_async(
            name or f"sampler-{uuid.uuid4().hex[:8]}"
        )
        saved = await future
        return SamplingClient(self._transport, model_path=saved.path)

    # -- information -----------------------------------------------------------------------
    def get_info(self) -> RunInfo:
        """The run's status, step, tokens trained, last loss and checkpoints."""
        info = RunInfo.from_json(self._transport.request("GET", f"/v1/runs/{self.run_id}"))
        if info.base_model:
            self._base_model = info.base_model
        return info

    async def get_info_async(self) -> RunInfo:
        return await asyncio.to_thread(self.get_info)

    def get_base_model(self) -> str:
        if not self._base_model:
            self.get_info()
        return self._base_model

    def get_tokenizer(self) -> Any:
        """The base model's tokenizer, built from the server's tokenizer files."""
        if self._tokenizer is None:
            from eztinker.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self._transport, self.get_base_model())
        return self._tokenizer

    def __repr__(self) -> str:
        return f"TrainingClient(run_id={self.run_id!r}, base_model={self._base_model!r})"
