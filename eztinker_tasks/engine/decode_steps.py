"""The steps of a decode batch (``engine.decode``): prefill, one decode step, pick, settle.

A request in the batch (``Live``) owns ``num_samples`` contiguous KV-cache rows and joined the
batch at some step (``start_step``): its token ``k`` is sampled at batch step
``start_step + k`` and fed back at position ``len(prompt) + k``. Rows of requests that joined
at different steps, or whose prompts differ in length, sit at different positions: decode
attention then masks each row to its own length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from eztinker_tasks.engine import lockstep
from eztinker_tasks.engine.kv_cache import KVStep
from eztinker_tasks.engine.multilora import Adapter, LoraContext, LoraRoute, Segment
from eztinker_tasks.engine.progress import Ticker
from eztinker_tasks.engine.sampler import (
    StopRule,
    Top,
    _prompt_logprobs,
    _string_hits,
    pick,
    publish,
    rows_of_tops,
)
from eztinker_tasks.errors import RequestCancelled
from eztinker_tasks.types import (
    ProgressFn,
    SampledSequence,
    SampleOutput,
    SamplingParams,
    TokenSink,
)

Cache = dict[int, tuple[torch.Tensor, torch.Tensor]]


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
    sink: TokenSink | None = None  # gets each step's tokens (``sampler.publish``)


@dataclass(eq=False)  # compared by identity
class Live:
    """A request in the batch: its cache rows, what it sampled so far, its stop state."""

    index: int  # its place among the batch's requests (the first ones, then those joining)
    request: DecodeRequest
    first_row: int
    start_step: int  # the batch step of its first token
    deadline: float  # time.monotonic() seconds
    tokens: torch.Tensor  # [n, max_tokens] int64
    logprobs: torch.Tensor  # [n, max_tokens] float32
    finished: torch.Tensor  # [n] bool
    kept: torch.Tensor  # [n] int64: tokens kept per row
    stop_ids: torch.Tensor
    ticker: Ticker
    history: list[list[int]]
    prompt_logprobs: list[float | None] | None = None
    tops: list[Top | None] = field(default_factory=list)  # per token: ``pick``'s top-k
    done: bool = False
    cancelled: bool = False  # its sink's consumer went away

    @classmethod
    def of(
        cls,
        index: int,
        request: DecodeRequest,
        first_row: int,
        start_step: int,
        deadline: float,
        device: torch.device,
    ) -> Live:
        n, m = request.num_samples, request.params.max_tokens
        return cls(
            index=index,
            request=request,
            first_row=first_row,
            start_step=start_step,
            deadline=deadline,
            tokens=torch.empty((n, m), dtype=torch.long, device=device),
            logprobs=torch.empty((n, m), dtype=torch.float32, device=device),
            finished=torch.zeros(n, dtype=torch.bool, device=device),
            kept=torch.full((n,), m, dtype=torch.long, device=device),
            stop_ids=torch.tensor(request.stop.token_ids, dtype=torch.long, device=device),
            ticker=Ticker(request.progress),
            history=[[] for _ in range(n)],
        )

    @property
    def rows(self) -> range:
        return range(self.first_row, self.first_row + self.request.num_samples)


def route_of(live: Sequence[Live], lengths: Sequence[int], dtype: torch.dtype) -> LoraRoute | None:
    """Segments over a packed forward's rows: ``lengths[i]`` rows of ``live[i]``'s adapter."""
    if all(item.request.adapter is None for item in live):
        return None
    segments: list[Segment] = []
    start = 0
    for item, n in zip(live, lengths, strict=True):
        adapter = item.request.adapter
        if segments and segments[-1].adapter is adapter:
            segments[-1].stop = start + n
        else:
            segments.append(Segment(adapter, start, start + n))
        start += n
    return LoraRoute(segments, dtype)


def active_of(live: Sequence[Live]) -> list[Live]:
    return [item for item in live if not item.done]


def grow(cache: Cache, rows: int, length: int) -> None:
    """Give every layer's cache ``rows`` rows of ``length`` positions (zeros where new)."""
    for idx, (keys, values) in list(cache.items()):
        old_rows, heads, old_length, dim = keys.shape
        if (old_rows, old_length) == (rows, length):
            continue
        new_k = keys.new_zeros((rows, heads, length, dim))
        new_v = values.new_zeros((rows, heads, length, dim))
        new_k[:old_rows, :, :old_length] = keys
        new_v[:old_rows, :, :old_length] = values
        cache[idx] = (new_k, new_v)


def prefill(
    model: nn.Module,
    context: LoraContext,
    live: Sequence[Live],
    cache: Cache,
    rows: int,
    length: int,
    dtype: torch.dtype,
    chunk_elements: int,
) -> list[torch.Tensor]:
    """Run every prompt of ``live`` once (packed); fill each request's cache rows; return each
    request's next-token logits [n, V] (float32)."""
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
    # The unembedding runs on the rows it is needed for: every position of a prompt whose
    # logprobs were asked for, the last position of the others (never [all tokens x vocab]).
    keep: list[int] = []
    counts: list[int] = []
    for j, item in enumerate(live):
        start, stop = bounds[j], bounds[j + 1]
        needed = range(start, stop) if item.request.want_prompt_logprobs else range(stop - 1, stop)
        keep.extend(needed)
        counts.append(len(needed))
    backbone: Any = getattr(model, "base_model")  # noqa: B009 (transformers' decoder stack)
    head: Any = getattr(model, "get_output_embeddings")()  # noqa: B009
    context.route = route_of(live, lens, dtype)
    try:
        hidden = backbone(
            input_ids=ids.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            use_cache=False,
            eztinker_kv=step,
        ).last_hidden_state[0]
        if len(keep) != hidden.shape[0]:
            hidden = hidden[keep]
        # The unembedding may carry LoRA too: its route must match the rows it is given.
        context.route = route_of(live, counts, dtype)
        logits = head(hidden)
    finally:
        context.route = None
    result = []
    for j, (item, own) in enumerate(zip(live, logits.split(counts), strict=True)):
        if item.request.want_prompt_logprobs:
            start, stop = bounds[j], bounds[j + 1]
            item.prompt_logprobs = _prompt_logprobs(own, ids[start:stop], chunk_elements)
        last = own[-1]
        result.append(last.float().unsqueeze(0).expand(item.request.num_samples, -1))
    return result


@dataclass
class Layout:
    """The rows of the requests in the batch, fixed until one leaves or joins (built once)."""

    active: list[Live]
    sizes: list[int]
    row_index: torch.Tensor  # [B] int64: each input row's cache row
    row_slice: slice | None  # the same as a slice when the rows are contiguous
    offsets: torch.Tensor  # [B] int64: position - batch step, per row
    largest_offset: int
    aligned: bool  # every row at the same position: attention needs no mask
    route: LoraRoute | None

    @classmethod
    def of(cls, active: list[Live], dtype: torch.dtype, device: torch.device) -> Layout:
        row_ids = [r for item in active for r in item.rows]
        offsets = [len(item.request.prompt) - item.start_step for item in active for _ in item.rows]
        sizes = [item.request.num_samples for item in active]
        contiguous = row_ids == list(range(row_ids[0], row_ids[0] + len(row_ids)))
        return cls(
            active=active,
            sizes=sizes,
            row_index=torch.tensor(row_ids, dtype=torch.long, device=device),
            row_slice=slice(row_ids[0], row_ids[0] + len(row_ids)) if contiguous else None,
            offsets=torch.tensor(offsets, dtype=torch.long, device=device),
            largest_offset=max(offsets),
            aligned=min(offsets) == max(offsets),
            route=route_of(active, sizes, dtype),
        )


def decode_step(
    model: nn.Module,
    context: LoraContext,
    layout: Layout,
    cache: Cache,
    rows: int,
    length: int,
    step: int,
) -> list[torch.Tensor]:
    """Feed each active row its token of batch ``step``; return each request's logits [n, V]."""
    tokens = torch.cat([item.tokens[:, step - item.start_step] for item in layout.active])
    positions = layout.offsets + step
    span = layout.largest_offset + step + 1
    mask = None  # aligned rows: SDPA may take its fused kernels (no mask allowed there)
    if not layout.aligned:
        arange = torch.arange(span, device=positions.device)
        mask = (arange <= positions[:, None])[:, None, None, :]
    kv_step = KVStep(
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
            eztinker_kv=kv_step,
        )
    finally:
        context.route = None
    return list(out.logits[0].float().split(layout.sizes))


def pick_tokens(item: Live, logits: torch.Tensor, step: int) -> None:
    """Sample ``item``'s token of batch ``step`` for each of its rows; update its stops."""
    req = item.request
    k = step - item.start_step
    token, token_lp, top = pick(logits, req.params, req.generator)
    item.tokens[:, k] = token
    item.logprobs[:, k] = token_lp
    item.tops.append(top)
    gone = req.sink is not None and publish(req.sink, k, token, token_lp, top, item.finished)
    if lockstep.active() is not None:  # only rank 0 streams: every rank ends it with rank 0
        gone = lockstep.agree_flags([gone])[0]
    if gone:
        item.cancelled = True  # ``settle`` ends it at once
    hit = torch.isin(token, item.stop_ids)
    if req.stop.strings:
        assert req.decode_text is not None
        for seq, t in zip(item.history, token.tolist(), strict=True):
            seq.append(t)
        done = item.finished.tolist()
        strings = _string_hits(item.history, done, req.stop.strings, req.decode_text)
        hit |= torch.tensor(strings, device=token.device)
    new = hit & ~item.finished
    item.kept = torch.where(new, k + 1, item.kept)
    item.finished |= new


def settle(live: Sequence[Live], step: int) -> list[Live]:
    """Mark the requests done after batch ``step`` (one device sync); return them."""
    active = active_of(live)
    if not active:
        return []
    all_done = torch.stack([item.finished.all() for item in active]).tolist()
    ended = []
    for item, finished in zip(active, all_done, strict=True):
        if (
            finished
            or item.cancelled
            or step - item.start_step + 1 == item.request.params.max_tokens
        ):
            item.done = True
            ended.append(item)
    return ended


def output_of(item: Live) -> SampleOutput | RequestCancelled:
    """An ended request's output (``RequestCancelled`` if its consumer went away)."""
    if item.cancelled:
        return RequestCancelled("the stream's consumer went away: generation stopped early")
    lengths, done = item.kept.tolist(), item.finished.tolist()
    token_rows, lp_rows = item.tokens.cpu().tolist(), item.logprobs.cpu().tolist()
    top_rows = rows_of_tops(item.tops, item.request.num_samples)
    sequences = [
        SampledSequence(
            tokens=token_rows[i][: lengths[i]],
            logprobs=lp_rows[i][: lengths[i]],
            stop_reason="stop" if done[i] else "length",
            top_logprobs=None if top_rows is None else top_rows[i][: lengths[i]],
        )
        for i in range(item.request.num_samples)
    ]
    return SampleOutput(sequences=sequences, prompt_logprobs=item.prompt_logprobs)
