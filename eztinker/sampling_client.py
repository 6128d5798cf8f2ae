"""``SamplingClient``: sample from, or score with, one set of weights.

The weights are a base model, a saved checkpoint (``model_path``, as returned by
``save_weights_for_sampler`` or ``save_state``), or a training run's live weights (made by
``TrainingClient.create_sampling_client()``: those samples queue behind the run's earlier
operations, so they see every optimizer step submitted before them).
"""

from __future__ import annotations

from typing import Any

from eztinker.futures import APIFuture, OrderedSubmitter, Submission
from eztinker.transport import Transport
from eztinker.types import ModelInput, SampleResponse, SamplingParams


def split_checkpoint_path(path: str) -> tuple[str, str]:
    """``"[eztinker://]<run_id>/<name>"`` -> ``(run_id, name)``."""
    raw = path.removeprefix("eztinker://")
    run_id, sep, name = raw.partition("/")
    if not sep or not run_id or not name or "/" in name:
        raise ValueError(f"checkpoint path {path!r} must look like '<run_id>/<name>'")
    return run_id, name


def prompt_fields(prompt: ModelInput | str | list[int]) -> dict[str, Any]:
    """The request fields for a prompt given as a ModelInput, token ids or text."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, ModelInput):
        return {"prompt_tokens": prompt.to_ints()}
    return {"prompt_tokens": [int(t) for t in prompt]}


class SamplingClient:
    """Samples from one set of weights (Tinker's ``SamplingClient``)."""

    def __init__(
        self,
        transport: Transport,
        *,
        base_model: str | None = None,
        model_path: str | None = None,
        run_id: str | None = None,
        submitter: OrderedSubmitter | None = None,
    ) -> None:
        given = [x for x in (base_model, model_path, run_id) if x]
        if len(given) > 1:
            raise ValueError("give at most one of base_model, model_path, run_id")
        if model_path:
            split_checkpoint_path(model_path)
        self._transport = transport
        self.model_path = model_path
        self.run_id = run_id
        self._base_model = base_model
        self._submitter = submitter or OrderedSubmitter("eztinker-sample")
        self._tokenizer: Any = None

    def _source(self) -> dict[str, str]:
        if self.run_id:
            return {"run_id": self.run_id}
        if self.model_path:
            return {"checkpoint": self.model_path}
        if self._base_model:
            return {"base_model": self._base_model}
        return {}

    def _submit(self, path: str, body: dict[str, Any], convert: Any) -> Submission[APIFuture[Any]]:
        op = path.rsplit("/", 1)[-1]

        def send() -> APIFuture[Any]:
            sent = self._transport.request("POST", path, json=body, idempotent=True)
            return APIFuture(
                self._transport, sent["future_id"], convert, op=op, run_id=sent.get("run_id")
            )

        return Submission(self._submitter.submit(send))

    # -- sampling --------------------------------------------------------------------------
    def sample_async(
        self,
        prompt: ModelInput | str | list[int],
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
        include_prompt_logprobs: bool = False,
    ) -> Submission[APIFuture[SampleResponse]]:
        """Queue a sample request at once; ``await`` the result for its future."""
        body: dict[str, Any] = {
            **self._source(),
            **prompt_fields(prompt),
            "num_samples": int(num_samples),
            **(sampling_params or SamplingParams()).to_json(),
        }
        if include_prompt_logprobs:
            body["prompt_logprobs"] = True
        return self._submit("/v1/sample", body, SampleResponse.from_json)

    def sample(
        self,
        prompt: ModelInput | str | list[int],
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
        include_prompt_logprobs: bool = False,
    ) -> APIFuture[SampleResponse]:
        """``num_samples`` continuations of ``prompt`` (a ModelInput, token ids or text)."""
        return self.sample_async(
            prompt, num_samples, sampling_params, include_prompt_logprobs
        ).result()

    def compute_logprobs_async(
        self, prompt: ModelInput | list[int]
    ) -> Submission[APIFuture[list[float | None]]]:
        tokens = prompt.to_ints() if isinstance(prompt, ModelInput) else [int(t) for t in prompt]
        body = {**self._source(), "tokens": tokens}
        return self._submit("/v1/compute_logprobs", body, lambda r: list(r["logprobs"]))

    def compute_logprobs(self, prompt: ModelInput | list[int]) -> APIFuture[list[float | None]]:
        """One logprob per prompt token (``None`` for the first)."""
        return self.compute_logprobs_async(prompt).result()

    # -- the model behind it ---------------------------------------------------------------
    def get_base_model(self) -> str:
        """The base model these weights belong to (asks the server once if needed)."""
        if not self._base_model:
            if self.run_id:
                body = self._transport.request("GET", f"/v1/runs/{self.run_id}")
            elif self.model_path:
                run_id, name = split_checkpoint_path(self.model_path)
                body = self._transport.request("GET", f"/v1/runs/{run_id}/checkpoints/{name}")
            else:
                body = self._transport.request("GET", "/v1/models")
                body = {"base_model": body.get("default_model")}
            self._base_model = str(body.get("base_model") or "")
        return self._base_model

    def get_tokenizer(self) -> Any:
        """The base model's tokenizer (see ``eztinker.tokenizer.load_tokenizer``)."""
        if self._tokenizer is None:
            from eztinker.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self._transport, self.get_base_model())
        return self._tokenizer

    def __repr__(self) -> str:
        source = self._source() or {"base_model": "<server default>"}
        return f"SamplingClient({', '.join(f'{k}={v!r}' for k, v in source.items())})"
