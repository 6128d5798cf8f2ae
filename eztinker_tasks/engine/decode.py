"""Our own decode loop: many sample requests, each with its own adapter (or none), one batch.

``decode(model, requests, ...)`` samples every request of a batch together:

- **Prefill once per request**: the prompts are packed into one row (positions restart per
  prompt, attention never crosses a prompt; ``engine.attention``) and run in ONE forward; each
  prompt's keys and values are written into the KV-cache rows of all its ``num_samples``.
- **Decode**: each step feeds one token per row of every unfinished request as one packed
  forward. Rows are grouped by adapter, so every LoRA layer adds each row's own adapter delta
  (``engine.multilora``: grouped matmuls on CUDA) while the frozen base weights are read once
  for the whole batch. A request leaves the batch when all its rows stopped.
- **KV cache** (``engine.kv_cache``): one per batch, sized before anything runs: a batch that
  would not fit in the device's free memory is refused with a ``user`` error
  (``check_kv_fits``), never an out-of-memory crash. The model's own layers (norms,
  projections, rotary or learned positions, MLP) run unchanged; only the attention is ours.

A request's tokens and logprobs do not depend on the rest of its batch: it samples from its own
rows' logits with its own generator, exactly as it would alone (``sampler.pick``: the logprob
of each sampled token is taken before top-k/top-p filtering), and rows never attend to each
other. Stops (token ids, strings checked on a decoded window) are per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from eztinker_tasks.engine.kv_cache import (
    KV_HEADROOM,
    KVStep,
    check_kv_fits,
    kv_attention_on,
    kv_bytes_per_token,
    kv_rows_and_length,
)
from eztinker_tasks.engine.multilora import Adapter, LoraContext, LoraRoute, Segment
from eztinker_tasks.engine.progress import Ticker
from eztinker_tasks.engine.sampler import StopRule, _prompt_logprobs, _string_hits, pick
from eztinker_tasks.errors import OperationTimeout
from eztinker_tasks.types import ProgressFn, SampledSequence, SampleOutput, SamplingParams

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


@dataclass
class DecodeRequest:
    """One sample request of a batch: ``num_samples`` continuations of ``prompt``."""

    prompt: list[int]
    num_samples: int
    params: SamplingParams
    stop: StopRule
    adapter: Adapter | None  # None: the bare base
    generator: torch.Generator  # on the model's device; seeded by the caller if asked
    want_prompt_logprobs: bool = False
    progress: ProgressFn | None = None
    decode_text: Callable[[list[int]], str] | None = None  # for stop strings


def supports(model: nn.Module) -> bool:
    """Whether ``decode`` can run ``model`` (else the caller uses ``sampler.generate``)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES


# --------------------------------------------------------------------------- the loop


@dataclass(eq=False)  # compared by identity
class _Live:
    """A request in the batch: its cache rows, what it sampled so far, its stop state."""

    request: DecodeRequest
    first_row: int
    tokens: torch.Tensor  # [n, max_tokens] int64
    logprobs: torch.Tensor  # [n, max_tokens] float32
    finished: torch.Tensor  # [n] bool
    kept: torch.Tensor  # [n] int64: tokens kept per row
    stop_ids: torch.Tensor
    ticker: Ticker
    history: list[list[int]]
    prompt_logprobs: list[float | None] | None = None
    done: bool = False

    @property
    def rows(self) -> range:
        return range(self.first_row, self.first_row + self.request.num_samples)


def _route(live: Sequence[_Live], lengths: Sequence[int], dtype: torch.dtype) -> LoraRoute | None:
    """Segments over a packed forward's rows: ``lengths[i]`` rows of ``live[i]``'s adapter."""
    if all(item.request.adapter is None for item in live):
        return None
    segments, start = [], 0
    for item, n in zip(live, lengths, strict=True):
        adapter = item.request.adapter
        if segments and segments[-1].adapter is adapter:
            segments[-1].stop = start + n
        else:
            segments.append(Segment(adapter, start, start + n))
        start += n
    return LoraRoute(segments, dtype)


def decode(
    model: nn.Module,
    context: LoraContext,
    requests: Sequence[DecodeRequest],
    *,
    deadline: float,
    chunk_elements: int,
) -> list[SampleOutput]:
    """Sample every request of ``requests`` in one batch; one ``SampleOutput`` per request.

    Raises ``OperationTimeout`` past ``deadline`` (``time.monotonic()`` seconds). The caller
    validates the requests (``sampler.check_request``) and the KV budget (``check_kv_fits``).
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    # Rows grouped by adapter (the bare base first), each request's rows contiguous.
    order = sorted(
        range(len(requests)),
        key=lambda i: (requests[i].adapter is not None, id(requests[i].adapter)),
    )
    live: list[_Live] = []
    row = 0
    for i in order:
        req = requests[i]
        n, m = req.num_samples, req.params.max_tokens
        live.append(
            _Live(
                request=req,
                first_row=row,
                tokens=torch.empty((n, m), dtype=torch.long, device=device),
                logprobs=torch.empty((n, m), dtype=torch.float32, device=device),
                finished=torch.zeros(n, dtype=torch.bool, device=device),
                kept=torch.full((n,), m, dtype=torch.long, device=device),
                stop_ids=torch.tensor(req.stop.token_ids, dtype=torch.long, device=device),
                ticker=Ticker(req.progress),
                history=[[] for _ in range(n)],
            )
        )
        row += n
    rows, length = kv_rows_and_length(requests)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def check_deadline() -> None:
        if time.monotonic() > deadline:
            raise OperationTimeout("sampling ran past its deadline", errors={"sample": ["timeout"]})

    with torch.no_grad(), kv_attention_on(model):
        check_deadline()
        for item in live:
            item.ticker.phase(
                "prefill", tokens_total=len(item.request.prompt), sequences=item.request.num_samples
            )
        logits = _prefill(model, context, live, cache, rows, length, dtype, chunk_elements)
        for item in live:
            item.ticker.phase(
                "decode",
                tokens_done=0,
                tokens_total=item.request.params.max_tokens,
                sequences=item.request.num_samples,
            )
        step = 0
        layout: _Layout | None = None
        while True:
            check_deadline()
            for item, item_logits in zip(_active(live), logits, strict=True):
                _pick(item, item_logits, step)
            _settle(live, step)
            active = _active(live)
            if not active:
                break
            for item in active:
                item.ticker.tick(step + 1, lambda item=item: int(item.finished.sum()))
            if layout is None or layout.active != active:
                layout = _Layout.of(active, dtype, device)
            logits = _decode_step(model, context, layout, cache, rows, length, step)
            step += 1

    results: list[SampleOutput | None] = [None] * len(requests)
    for i, item in zip(order, live, strict=True):
        results[i] = _output(item)
    return [r for r in results if r is not None]


def _active(live: Sequence[_Live]) -> list[_Live]:
    return [item for item in live if not item.done]


def _prefill(
    model: nn.Module,
    context: LoraContext,
    live: Sequence[_Live],
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]],
    rows: int,
    length: int,
    dtype: torch.dtype,
    chunk_elements: int,
) -> list[torch.Tensor]:
    """Run every prompt once (packed); fill each request's cache rows; return each request's
    next-token logits [n, V] (float32)."""
    device = next(model.parameters()).device
    prompts = [item.request.prompt for item in live]
    lens = [len(p) for p in prompts]
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    write_rows, write_pos, write_src = [], [], []
    for item, n, start in zip(live, lens, bounds, strict=False):
        pos = torch.arange(n, device=device)
        for r in item.rows:
            write_rows.append(torch.full((n,), r, dtype=torch.long, device=device))
            write_pos.append(pos)
            write_src.append(pos + start)
    step = KVStep(
        cache=cache,
        rows=rows,
        length=length,
        prefill=True,
        cu=torch.tensor(bounds, dtype=torch.int32, device=device),
        max_len=max(lens),
        bounds=bounds,
        write_rows=torch.cat(write_rows),
        write_pos=torch.cat(write_pos),
        write_src=torch.cat(write_src),
    )
    want_all = any(item.request.want_prompt_logprobs for item in live)
    backbone: Any = getattr(model, "base_model")  # noqa: B009 (transformers' decoder stack)
    head: Any = getattr(model, "get_output_embeddings")()  # noqa: B009
    context.route = _route(live, lens, dtype)
    try:
        hidden = backbone(
            input_ids=ids.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            use_cache=False,
            eztinker_kv=step,
        ).last_hidden_state[0]
        # The unembedding may carry LoRA too: its route must match the rows it is given.
        if not want_all:
            hidden = hidden[[b - 1 for b in bounds[1:]]]
            context.route = _route(live, [1] * len(live), dtype)
        all_logits = head(hidden)
    finally:
        context.route = None
    result = []
    for j, item in enumerate(live):
        start, stop = bounds[j], bounds[j + 1]
        if want_all:
            if item.request.want_prompt_logprobs:
                item.prompt_logprobs = _prompt_logprobs(
                    all_logits[start:stop], ids[start:stop], chunk_elements
                )
            last = all_logits[stop - 1]
        else:
            last = all_logits[j]
        result.append(last.float().unsqueeze(0).expand(item.request.num_samples, -1))
    return result


@dataclass
class _Layout:
    """The rows of the requests in the batch, fixed until one of them leaves (built once)."""

    active: list[_Live]
    sizes: list[int]
    row_index: torch.Tensor  # [B] int64: each input row's cache row
    row_slice: slice | None  # the same as a slice when the rows are contiguous
    prompt_lens: torch.Tensor  # [B] int64: each row's prompt length
    longest_prompt: int
    aligned: bool  # every row at the same position: attention needs no mask
    route: LoraRoute | None

    @classmethod
    def of(cls, active: list[_Live], dtype: torch.dtype, device: torch.device) -> _Layout:
        row_ids = [r for item in active for r in item.rows]
        lens = [len(item.request.prompt) for item in active for _ in item.rows]
        sizes = [item.request.num_samples for item in active]
        contiguous = row_ids == list(range(row_ids[0], row_ids[0] + len(row_ids)))
        return cls(
            active=active,
            sizes=sizes,
            row_index=torch.tensor(row_ids, dtype=torch.long, device=device),
            row_slice=slice(row_ids[0], row_ids[0] + len(row_ids)) if contiguous else None,
            prompt_lens=torch.tensor(lens, dtype=torch.long, device=device),
            longest_prompt=max(lens),
            aligned=min(lens) == max(lens),
            route=_route(active, sizes, dtype),
        )


def _decode_step(
    model: nn.Module,
    context: LoraContext,
    layout: _Layout,
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]],
    rows: int,
    length: int,
    step: int,
) -> list[torch.Tensor]:
    """Feed each active row its token of ``step``; return each request's logits [n, V]."""
    tokens = torch.cat([item.tokens[:, step] for item in layout.active])
    positions = layout.prompt_lens + step
    span = layout.longest_prompt + step + 1
    mask = None  # aligned rows: SDPA may take its fused kernels (no mask allowed there)
    if not layout.aligned:
        arange = torch.arange(span, device=positions.device)
        mask = (arange <= positions[:, None])[:, None, None, :]
    decode_step = KVStep(
        cache=cache,
        rows=rows,
        length=length,
        prefill=False,
        row_index=layout.row_index,
        row_slice=layout.row_slice,
        positions=positions,
        span=span,
        mask=mask,
    )
    context.route = layout.route
    try:
        out = model(
            input_ids=tokens.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            use_cache=False,
            logits_to_keep=0,
            eztinker_kv=decode_step,
        )
    finally:
        context.route = None
    return list(out.logits[0].float().split(layout.sizes))


def _pick(item: _Live, logits: torch.Tensor, step: int) -> None:
    """Sample ``item``'s token of ``step`` for each of its rows; update its stop state."""
    req = item.request
    token, token_lp = pick(logits, req.params, req.generator)
    item.tokens[:, step] = token
    item.logprobs[:, step] = token_lp
    hit = torch.isin(token, item.stop_ids)
    if req.stop.strings:
        assert req.decode_text is not None
        for seq, t in zip(item.history, token.tolist(), strict=True):
            seq.append(t)
        done = item.finished.tolist()
        strings = _string_hits(item.history, done, req.stop.strings, req.decode_text)
        hit |= torch.tensor(strings, device=token.device)
    new = hit & ~item.finished
    item.kept = torch.where(new, step + 1, item.kept)
    item.finished |= new


def _settle(live: Sequence[_Live], step: int) -> None:
    """Mark the requests that are done after ``step`` (one device sync for the batch)."""
    active = _active(live)
    if not active:
        return
    all_done = torch.stack([item.finished.all() for item in active]).tolist()
    for item, finished in zip(active, all_done, strict=True):
        if finished or step + 1 == item.request.params.max_tokens:
            item.done = True


def _output(item: _Live) -> SampleOutput:
    lengths, done = item.kept.tolist(), item.finished.tolist()
    token_rows, lp_rows = item.tokens.cpu().tolist(), item.logprobs.cpu().tolist()
    sequences = [
        SampledSequence(
            tokens=token_rows[i][: lengths[i]],
            logprobs=lp_rows[i][: lengths[i]],
            stop_reason="stop" if done[i] else "length",
        )
        for i in range(item.request.num_samples)
    ]
    return SampleOutput(sequences=sequences, prompt_logprobs=item.prompt_logprobs)
