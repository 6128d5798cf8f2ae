"""Our own decode loop: many sample requests, each with its own adapter (or none), one batch,
which new requests join while it runs (continuous batching).

``decode(model, context, requests, ...)`` samples every request of a batch together:

- **Prefill once per request**: the prompts are packed into one row (positions restart per
  prompt, attention never crosses a prompt; ``engine.attention``) and run in ONE forward; each
  prompt's keys and values are written into the KV-cache rows of all its ``num_samples``.
- **Decode**: each step feeds one token per row of every unfinished request as one packed
  forward. Rows come grouped by adapter, so every LoRA layer adds each row's own adapter
  delta (``engine.multilora``: grouped matmuls on CUDA) while the frozen base weights are read
  once for the whole batch. A request leaves the batch when all its rows stopped, and is
  handed to ``on_done`` at once (its caller need not wait for the rest of the batch).
- **Joining**: while the first request runs, ``poll`` is asked for new requests (at most
  every ``poll_interval_s``); they are prefilled and join the batch at the next step.
  The cache grows for them if the free memory allows; otherwise they run in a batch of their
  own once this one ends.
- **KV cache** (``engine.kv_cache``): sized before anything runs: a request that would not fit
  in the device's free memory is refused by the caller (``check_kv_fits``), never an
  out-of-memory crash. The model's own layers (norms, projections, rotary or learned
  positions, MLP) run unchanged; only the attention is ours.

A request's tokens and logprobs do not depend on the rest of its batch, nor on when it joined:
it samples from its own rows' logits with its own generator, exactly as it would alone
(``sampler.pick``: the logprob of each sampled token is taken before top-k/top-p filtering),
and rows never attend to each other. Stops (token ids, strings checked on a decoded window)
and the timeout (``timeout_s`` from the request's start) are per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from eztinker_tasks.engine import lockstep
from eztinker_tasks.engine.decode_steps import (
    Cache,
    DecodeRequest,
    Layout,
    Live,
    active_of,
    decode_step,
    grow,
    output_of,
    pick_tokens,
    prefill,
    settle,
)
from eztinker_tasks.engine.kv_cache import (
    KV_HEADROOM,
    check_kv_fits,
    kv_attention_on,
    kv_bytes_per_token,
    kv_rows_and_length,
)
from eztinker_tasks.engine.multilora import LoraContext
from eztinker_tasks.errors import EZTinkerError, OperationTimeout
from eztinker_tasks.types import SampleOutput

__all__ = [
    "KV_HEADROOM",
    "DecodeRequest",
    "check_kv_fits",
    "decode",
    "kv_bytes_per_token",
    "supports",
]
# The transformers model types whose attention goes through ``AttentionInterface`` with a
# ``layer_idx`` on every attention module, checked by the tests (others use ``generate``).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "gpt2", "qwen2", "qwen3", "mistral"})

Outcome = SampleOutput | EZTinkerError
Poll = Callable[[], Sequence[DecodeRequest]]
OnDone = Callable[[int, Outcome], None]


def supports(model: nn.Module) -> bool:
    """Whether ``decode`` can run ``model`` (else the caller uses ``sampler.generate``)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES


class _Batch:
    """The state of one decode batch: its requests, their cache rows, the cache."""

    def __init__(
        self,
        model: nn.Module,
        context: LoraContext,
        timeout_s: float,
        chunk_elements: int,
        free_bytes: Callable[[], int | None],
    ) -> None:
        self.model, self.context = model, context
        self.timeout_s, self.chunk_elements = timeout_s, chunk_elements
        self.free_bytes = free_bytes
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.live: list[Live] = []  # the requests still running (``decode`` drops ended ones)
        self.cache: Cache = {}
        self.rows = 0
        self.length = 0
        self.free: list[tuple[int, int]] = []  # (first row, rows) given back by ended requests
        self.count = 0  # requests taken so far (their indices)

    def admit(self, requests: Sequence[DecodeRequest], step: int) -> list[torch.Tensor]:
        """Give ``requests`` cache rows, prefill them; their first logits (one per request)."""
        # Rows grouped by adapter (the bare base first), each request's rows contiguous.
        order = sorted(
            range(len(requests)),
            key=lambda i: (requests[i].adapter is not None, id(requests[i].adapter)),
        )
        now = time.monotonic()
        firsts, self.free, self.rows = self._place([requests[i].num_samples for i in order])
        joining = [
            Live.of(self.count + i, requests[i], first, step, now + self.timeout_s, self.device)
            for i, first in zip(order, firsts, strict=True)
        ]
        self.count += len(requests)
        self.length = max(self.length, kv_rows_and_length(requests)[1])
        grow(self.cache, self.rows, self.length)
        for item in joining:
            item.ticker.phase(
                "prefill", tokens_total=len(item.request.prompt), sequences=item.request.num_samples
            )
        logits = prefill(
            self.model,
            self.context,
            joining,
            self.cache,
            self.rows,
            self.length,
            self.dtype,
            self.chunk_elements,
        )
        for item in joining:
            item.ticker.phase(
                "decode",
                tokens_done=0,
                tokens_total=item.request.params.max_tokens,
                sequences=item.request.num_samples,
            )
        self.live += joining
        return logits

    def release(self, item: Live) -> None:
        """Give an ended request's rows back (a request joining later may take them)."""
        self.free.append((item.first_row, item.request.num_samples))

    def _place(self, sizes: Sequence[int]) -> tuple[list[int], list[tuple[int, int]], int]:
        """First rows for requests of ``sizes`` rows: in freed blocks first (first fit), else
        new rows at the end. Returns (first rows, the free blocks left, the rows in all)."""
        free = sorted(self.free)
        rows = self.rows
        firsts = []
        for size in sizes:
            for k, (start, count) in enumerate(free):
                if count >= size:
                    firsts.append(start)
                    free[k] = (start + size, count - size)
                    break
            else:
                firsts.append(rows)
                rows += size
        return firsts, [(s, c) for s, c in free if c > 0], rows

    def fits(self, requests: Sequence[DecodeRequest]) -> bool:
        """Whether the cache (reusing freed rows) can hold ``requests`` in the free memory."""
        free = self.free_bytes()
        if free is None:
            return True
        _, _, rows = self._place([r.num_samples for r in requests])
        length = max(self.length, kv_rows_and_length(requests)[1])
        extra = rows * length - self.rows * self.length
        return extra * kv_bytes_per_token(self.model) <= KV_HEADROOM * free


def decode(
    model: nn.Module,
    context: LoraContext,
    requests: Sequence[DecodeRequest],
    *,
    timeout_s: float,
    chunk_elements: int,
    poll: Poll | None = None,
    on_done: OnDone | None = None,
    poll_interval_s: float = 0.05,
    free_bytes: Callable[[], int | None] = lambda: None,
) -> list[Outcome]:
    """Sample ``requests`` (and those ``poll`` adds) in one batch; one outcome per request.

    Outcomes are in order: ``requests`` first, then the joined ones as ``poll`` returned them;
    each is a ``SampleOutput`` or the ``OperationTimeout`` of a request that ran past
    ``timeout_s`` (seconds from its start). ``on_done(index, outcome)`` is called as each one
    ends. The caller validates each request (``sampler.check_request``) and its KV budget
    (``check_kv_fits``); ``free_bytes()`` (bytes, None: unknown) decides whether the cache can
    grow for joining requests.
    """
    batch = _Batch(model, context, timeout_s, chunk_elements, free_bytes)
    outcomes: dict[int, Outcome] = {}
    deferred: list[tuple[int, DecodeRequest]] = []  # (index, request)

    def record(item: Live, outcome: Outcome) -> None:
        batch.release(item)
        outcomes[item.index] = outcome
        if on_done is not None:
            on_done(item.index, outcome)

    with torch.no_grad(), kv_attention_on(model):
        logits = batch.admit(requests, 0)
        step, layout = 0, None
        polled_at = time.monotonic()
        while True:  # ``batch.live`` holds the requests still running, joined ones last
            for item, item_logits in zip(batch.live, logits, strict=True):
                pick_tokens(item, item_logits, step)
            for item in settle(batch.live, step):
                record(item, output_of(item))
            now = time.monotonic()
            running_now = active_of(batch.live)
            late = lockstep.agree_flags([now > item.deadline for item in running_now])
            for item, is_late in zip(running_now, late, strict=True):
                if is_late:
                    item.done = True
                    record(item, OperationTimeout("sampling ran past its deadline"))
            batch.live = active_of(batch.live)  # the ended ones leave (their rows are free)
            joined: list[torch.Tensor] = []
            leading = any(item.index == 0 for item in batch.live)
            if poll is not None and leading and now - polled_at >= poll_interval_s:
                polled_at = now
                new = list(poll())
                if new and batch.fits(new):
                    joined = batch.admit(new, step + 1)
                else:
                    for request in new:
                        deferred.append((batch.count, request))
                        batch.count += 1
            if not batch.live:
                break
            running = [item for item in batch.live if item.start_step <= step]
            for item in running:
                item.ticker.tick(
                    step - item.start_step + 1, lambda item=item: int(item.finished.sum())
                )
            if running:
                if layout is None or layout.active != running:
                    layout = Layout.of(running, batch.dtype, batch.device)
                logits = decode_step(
                    model, context, layout, batch.cache, batch.rows, batch.length, step
                )
            else:
                logits = []
            logits = logits + joined  # joined requests come last in ``batch.live``
            step += 1

    if deferred:  # no room in this batch's memory when they came: a batch of their own
        fitting = []
        for index, request in deferred:  # each must fit alone, now that the batch is gone
            try:
                check_kv_fits(model, [request], free_bytes())
                fitting.append((index, request))
            except EZTinkerError as exc:
                outcomes[index] = exc
                if on_done is not None:
                    on_done(index, exc)
        deferred = fitting
    if deferred:
        indices = [index for index, _ in deferred]
        shifted = None if on_done is None else (lambda i, o: on_done(indices[i], o))
        later = decode(
            model,
            context,
            [request for _, request in deferred],
            timeout_s=timeout_s,
            chunk_elements=chunk_elements,
            on_done=shifted,
            free_bytes=free_bytes,
        )
        outcomes.update(zip(indices, later, strict=True))
    return [outcomes[i] for i in range(batch.count)]
