"""``Engine.sample_many``: many sample requests, one decode batch per base model.

Each request is validated and resolved on its own (an error stays that request's), then the
requests on one base decode together (``engine.decode``) in as few batches as their KV caches
allow in the free device memory. Models ``engine.decode`` does not run use the
transformers-cache sampler (``sampler.generate``), one request at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial

import torch

from eztinker_tasks.engine import decode as decoding
from eztinker_tasks.engine import sampler
from eztinker_tasks.engine.config import EngineConfig
from eztinker_tasks.engine.memory import free_bytes
from eztinker_tasks.engine.models import LoadedBase
from eztinker_tasks.engine.multilora import Adapter, LoraRoute
from eztinker_tasks.errors import EZTinkerError, InternalError, InvalidRequest
from eztinker_tasks.types import SampleCall, SampleOutput, SampleSource

Resolve = Callable[[SampleSource], tuple[LoadedBase, Adapter | None, torch.Generator]]
Item = tuple[int, decoding.DecodeRequest]
Outcome = SampleOutput | EZTinkerError


def sample_many(
    resolve: Resolve,
    calls: Sequence[SampleCall],
    config: EngineConfig,
    *,
    poll: Callable[[], Sequence[SampleCall]] | None = None,
    on_done: Callable[[int, Outcome], None] | None = None,
) -> list[Outcome]:
    """One outcome per call, in order: its ``SampleOutput`` or the ``EZTinkerError`` it raised.

    ``poll`` (optional) is asked, while the first call runs, for more calls to join its batch
    (``engine.decode``); their outcomes follow those of ``calls``, in the order ``poll``
    returned them. ``on_done(index, outcome)`` is called as each request ends. A call that
    cannot be prepared (bad input, unknown source, an unreadable checkpoint: any exception)
    fails alone.
    """
    outcomes: dict[int, Outcome] = {}
    total = len(calls)
    later: list[tuple[int, SampleCall]] = []  # joined calls that cannot join this batch

    def done(index: int, outcome: Outcome) -> None:
        outcomes[index] = outcome
        if on_done is not None:
            on_done(index, outcome)

    batches: dict[str, tuple[LoadedBase, list[Item]]] = {}
    for i, call in enumerate(calls):
        try:
            base, request = prepare(resolve, call)
            if decoding.supports(base.model):
                batches.setdefault(base.name, (base, []))[1].append((i, request))
            else:
                done(i, generate_one(base, request, config))
        except Exception as exc:  # each request's own failure
            done(i, as_error(exc))
    polling = poll
    for base, items in batches.values():
        for batch in kv_batches(base, items):
            index_of = [i for i, _ in batch]

            def join(base: LoadedBase = base, index_of: list[int] = index_of) -> list:
                nonlocal total
                assert poll is not None
                joined = []
                for call in poll():
                    i, total = total, total + 1
                    try:
                        # Whether it fits beside the batch is decode's to decide (or to
                        # run it after); whether it fits alone is checked then.
                        call_base, request = prepare(resolve, call, check_fit=False)
                    except Exception as exc:  # its own failure
                        done(i, as_error(exc))
                        continue
                    if call_base.name != base.name:
                        later.append((i, call))
                        continue
                    index_of.append(i)
                    joined.append(request)
                return joined

            decoding.decode(
                base.model,
                base.context,
                [request for _, request in batch],
                timeout_s=config.sample_timeout_s,
                chunk_elements=config.logprob_chunk_elements,
                poll=join if polling is not None else None,
                on_done=lambda k, outcome, index_of=index_of: done(index_of[k], outcome),
                free_bytes=lambda base=base: free_bytes(base.device),
            )
            polling = None  # only the first batch takes new calls
    for i, call in later:
        [outcome] = sample_many(resolve, [call], config)
        done(i, outcome)
    return [outcomes[i] for i in range(total)]


def prepare(
    resolve: Resolve, call: SampleCall, check_fit: bool = True
) -> tuple[LoadedBase, decoding.DecodeRequest]:
    """Resolve and validate ``call``, and (``check_fit``) check that its KV cache fits alone.

    Raises ``EZTinkerError`` (unknown source, bad input, too large for the device), or
    whatever loading its weights raised.
    """
    base, adapter, generator = resolve(call.source)
    request = decode_request(base, adapter, generator, call)
    if check_fit and decoding.supports(base.model):
        decoding.check_kv_fits(base.model, [request], free_bytes(base.device))
    return base, request


def as_error(exc: Exception) -> EZTinkerError:
    """``exc`` as one request's error: itself, or an ``InternalError`` (category server)."""
    if isinstance(exc, EZTinkerError):
        return exc
    return InternalError(f"this sample request failed: {type(exc).__name__}: {exc}")


def decode_request(
    base: LoadedBase, adapter: Adapter | None, generator: torch.Generator, call: SampleCall
) -> decoding.DecodeRequest:
    """Validate ``call`` (``sampler.check_request``) into a request for ``engine.decode``.

    The request gets a generator of its own (on the model's device), seeded with the call's
    seed or with one drawn from ``generator`` (its run's, or the engine's).
    """
    tokens, stop = sampler.check_request(
        call.prompt_tokens, call.num_samples, call.params, base.info, base.tokenizer is not None
    )
    # Every request draws from a generator of its own: its seed, or one seed drawn from the
    # shared generator (its run's, or the engine's) when it starts. Requests of one run in one
    # batch would otherwise interleave their draws, and each one's samples would depend on
    # what else was in the batch.
    seed = call.params.seed
    if seed is None:
        drawn = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
        seed = int(drawn.item())
    generator = torch.Generator(generator.device)
    generator.manual_seed(seed)
    decode_text: Callable[[list[int]], str] | None = None
    if base.tokenizer is not None:
        decode_text = partial(base.tokenizer.decode, skip_special_tokens=False)
    return decoding.DecodeRequest(
        prompt=tokens,
        num_samples=call.num_samples,
        params=call.params,
        stop=stop,
        adapter=adapter,
        generator=generator,
        want_prompt_logprobs=call.prompt_logprobs,
        progress=call.progress,
        decode_text=decode_text,
        sink=call.sink,
    )


def generate_one(
    base: LoadedBase, request: decoding.DecodeRequest, config: EngineConfig
) -> SampleOutput:
    """The transformers-cache sampler, for models ``engine.decode`` does not run."""
    dtype = base.dtype
    adapter = request.adapter
    base.context.route = None if adapter is None else LoraRoute.single(adapter, dtype)
    try:
        return sampler.generate(
            base.model,
            base.cache_kwarg,
            request.prompt,
            request.num_samples,
            request.params,
            request.stop,
            decode=request.decode_text,
            generator=request.generator,
            deadline=time.monotonic() + config.sample_timeout_s,
            want_prompt_logprobs=request.want_prompt_logprobs,
            chunk_elements=config.logprob_chunk_elements,
            progress=request.progress,
            sink=request.sink,
        )
    finally:
        base.context.route = None


def kv_batches(base: LoadedBase, items: list[Item]) -> list[list[Item]]:
    """Split requests (each fits alone) into batches whose KV caches fit the free memory."""
    free = free_bytes(base.device)
    batches: list[list[Item]] = []
    for item in items:
        if batches:
            try:
                decoding.check_kv_fits(base.model, [r for _, r in [*batches[-1], item]], free)
                batches[-1].append(item)
                continue
            except InvalidRequest:
                pass
        batches.append([item])
    return batches
