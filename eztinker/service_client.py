"""``ServiceClient``: the entry point. Connects to one EZTinker server and makes the other
clients; also lists and manages runs, checkpoints and futures.

    import eztinker
    from eztinker import types

    service = eztinker.ServiceClient()            # EZTINKER_BASE_URL, else localhost:8000
    tc = service.create_lora_training_client("tiny-gpt2", rank=16)
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eztinker.archive import safe_extract
from eztinker.errors import EZTinkerError
from eztinker.futures import APIFuture
from eztinker.history import MetricPoint
from eztinker.sampling_client import SamplingClient, split_checkpoint_path
from eztinker.training_client import TrainingClient
from eztinker.transport import RetryPolicy, Transport
from eztinker.types import Checkpoint, RunInfo, ServerCapabilities


class ServiceClient:
    """A connection to one EZTinker server (Tinker's ``ServiceClient``).

    ``base_url`` defaults to ``EZTINKER_BASE_URL``, then ``http://localhost:8000``;
    ``api_key`` to ``EZTINKER_API_KEY``. ``max_retries`` bounds retries of transient failures.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 6,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.transport = Transport(
            base_url, api_key, timeout=timeout, retry=retry or RetryPolicy(max_retries=max_retries)
        )

    @property
    def base_url(self) -> str:
        return self.transport.base_url

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the server ------------------------------------------------------------------------
    def get_server_capabilities(self) -> ServerCapabilities:
        """The models this server can train and sample, and its default model."""
        return ServerCapabilities.from_json(self.transport.request("GET", "/v1/models"))

    async def get_server_capabilities_async(self) -> ServerCapabilities:
        return await asyncio.to_thread(self.get_server_capabilities)

    def health(self) -> dict[str, Any]:
        """``GET /health``: broker, live workers (their runs and queue depths). Answers even
        when the service is degraded (``status`` says so)."""
        return self.transport.request("GET", "/health", accept=(503,))

    # -- training clients ------------------------------------------------------------------
    def _create_run(self, body: dict[str, Any]) -> TrainingClient:
        created = self.transport.request("POST", "/v1/runs", json=body)
        info = APIFuture(self.transport, created["future_id"], op="create_run").result()
        base = (info or {}).get("base_model") or created.get("base_model") or ""
        return TrainingClient(self.transport, created["run_id"], base, next_seq_id=1)

    def create_lora_training_client(
        self,
        base_model: str | None = None,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        *,
        alpha: float | None = None,
    ) -> TrainingClient:
        """Create a LoRA run on ``base_model`` (None: the server's default) and wait until it
        is ready (the base model loaded on its worker)."""
        body: dict[str, Any] = {
            "rank": int(rank),
            "train_mlp": train_mlp,
            "train_attn": train_attn,
            "train_unembed": train_unembed,
        }
        if base_model:
            body["base_model"] = base_model
        if seed is not None:
            body["seed"] = int(seed)
        if alpha is not None:
            body["alpha"] = float(alpha)
        return self._create_run(body)

    async def create_lora_training_client_async(
        self,
        base_model: str | None = None,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        *,
        alpha: float | None = None,
    ) -> TrainingClient:
        return await asyncio.to_thread(
            self.create_lora_training_client,
            base_model, rank, seed, train_mlp, train_attn, train_unembed, alpha=alpha,
        )  # fmt: skip

    def create_training_client_from_state(self, path: str) -> TrainingClient:
        """A new run starting from a saved state's weights (fresh optimizer state)."""
        return self._create_run({"from_state": path, "optimizer": False})

    def create_training_client_from_state_with_optimizer(self, path: str) -> TrainingClient:
        """A new run starting from a saved state's weights and optimizer state (to resume)."""
        return self._create_run({"from_state": path, "optimizer": True})

    async def create_training_client_from_state_async(self, path: str) -> TrainingClient:
        return await asyncio.to_thread(self.create_training_client_from_state, path)

    async def create_training_client_from_state_with_optimizer_async(
        self, path: str
    ) -> TrainingClient:
        return await asyncio.to_thread(self.create_training_client_from_state_with_optimizer, path)

    def create_training_client(self, run_id: str) -> TrainingClient:
        """Attach to an existing run (made by another process, or the CLI).

        Its first operation is numbered by the server and later ones continue from there;
        do not drive the same run from two clients at once.
        """
        info = self.get_run(run_id)
        return TrainingClient(self.transport, run_id, info.base_model, next_seq_id=None)

    # -- sampling clients ------------------------------------------------------------------
    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        *,
        run_id: str | None = None,
    ) -> SamplingClient:
        """Sample a base model, a saved checkpoint (``model_path``) or a run's live weights."""
        return SamplingClient(
            self.transport, base_model=base_model, model_path=model_path, run_id=run_id
        )

    async def create_sampling_client_async(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        *,
        run_id: str | None = None,
    ) -> SamplingClient:
        return self.create_sampling_client(model_path, base_model, run_id=run_id)

    # -- runs ------------------------------------------------------------------------------
    def list_runs(self) -> list[RunInfo]:
        body = self.transport.request("GET", "/v1/runs")
        return [RunInfo.from_json(r) for r in body.get("runs", [])]

    def get_run(self, run_id: str) -> RunInfo:
        return RunInfo.from_json(self.transport.request("GET", f"/v1/runs/{run_id}"))

    def get_metrics(self, run_id: str, after: int = 0) -> list[MetricPoint]:
        """The run's metrics history: one point per ``forward_backward`` and ``optim_step``
        (with a seq_id above ``after``), in seq_id order. Raises NotFoundError for a run that
        does not exist (or is another tenant's)."""
        params = {"after": after} if after else None
        body = self.transport.request("GET", f"/v1/runs/{run_id}/metrics", params=params)
        return [MetricPoint.from_json(p) for p in body.get("points", [])]

    def delete_run(self, run_id: str) -> APIFuture[Any]:
        """Delete a run after its queued operations (its checkpoints stay on disk)."""
        sent = self.transport.request("DELETE", f"/v1/runs/{run_id}")
        return APIFuture(self.transport, sent["future_id"], op="delete_run", run_id=run_id)

    def get_future(self, future_id: str) -> APIFuture[Any]:
        """A future by id (e.g. one printed by ``eztinker ... --no-wait``); results are JSON."""
        return APIFuture(self.transport, future_id)

    # -- checkpoints -----------------------------------------------------------------------
    def list_checkpoints(self, run_id: str | None = None) -> list[Checkpoint]:
        path = f"/v1/runs/{run_id}/checkpoints" if run_id else "/v1/checkpoints"
        body = self.transport.request("GET", path)
        return [Checkpoint.from_json(c) for c in body.get("checkpoints", [])]

    def get_checkpoint(self, path: str) -> Checkpoint:
        run_id, name = split_checkpoint_path(path)
        body = self.transport.request("GET", f"/v1/runs/{run_id}/checkpoints/{name}")
        return Checkpoint.from_json(body)

    def delete_checkpoint(self, path: str) -> Checkpoint:
        run_id, name = split_checkpoint_path(path)
        body = self.transport.request("DELETE", f"/v1/runs/{run_id}/checkpoints/{name}")
        return Checkpoint.from_json(body)

    def download_checkpoint(
        self,
        path: str,
        dest: str | Path = ".",
        *,
        overwrite: bool = False,
        on_progress: Callable[[int, int | None], None] | None = None,
    ) -> Path:
        """Download checkpoint ``path`` and extract it safely to ``dest/<name>/``.

        ``on_progress(bytes_received, bytes_total)`` is called after each chunk (1 MiB);
        ``bytes_total`` is None if the server did not say.
        """
        run_id, name = split_checkpoint_path(path)
        target = Path(dest) / name
        if target.exists() and not overwrite:
            raise EZTinkerError(f"{target} already exists (pass overwrite=True / --force)")
        url = f"/v1/runs/{run_id}/checkpoints/{name}/archive"
        with tempfile.TemporaryFile() as spool:
            with self.transport.stream("GET", url, timeout=600.0) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                received = 0
                for chunk in response.iter_bytes(1 << 20):
                    spool.write(chunk)
                    received += len(chunk)
                    if on_progress is not None:
                        on_progress(received, total)
            spool.seek(0)
            safe_extract(spool, dest)
        return target

    # -- tokenizers ------------------------------------------------------------------------
    def tokenize(self, text: str, base_model: str | None = None) -> list[int]:
        body: dict[str, Any] = {"text": text}
        if base_model:
            body["base_model"] = base_model
        return list(
            self.transport.request("POST", "/v1/tokenize", json=body, idempotent=True)["tokens"]
        )

    def detokenize(self, tokens: list[int], base_model: str | None = None) -> str:
        body: dict[str, Any] = {"tokens": [int(t) for t in tokens]}
        if base_model:
            body["base_model"] = base_model
        return str(
            self.transport.request("POST", "/v1/detokenize", json=body, idempotent=True)["text"]
        )

    def get_tokenizer(self, base_model: str) -> Any:
        """A model's tokenizer, built from the server's tokenizer files."""
        from eztinker.tokenizer import load_tokenizer

        return load_tokenizer(self.transport, base_model)

    def __repr__(self) -> str:
        return f"ServiceClient(base_url={self.base_url!r})"
