"""Batched sampling with a KV cache, plus prompt/sequence logprobs.

``generate`` prefills the prompt ONCE, expands the KV cache to ``num_samples`` rows and then
decodes all samples together, one token per step. Each sampled token's logprob is taken from
the temperature-scaled distribution BEFORE top-k/top-p filtering (at temperature 1 it is the
learner's logprob; at temperature 0, greedy, it is the unscaled distribution's). Stops: token
ids and strings (checked on a decoded window of the newest tokens), EOS unless ``stop=()``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from eztinker_tasks.engine import lockstep
from eztinker_tasks.engine.batching import check_length, token_array
from eztinker_tasks.engine.logprobs import target_logprobs
from eztinker_tasks.engine.progress import Ticker
from eztinker_tasks.errors import InvalidRequest, OperationTimeout, RequestCancelled
from eztinker_tasks.limits import check_sampling_params
from eztinker_tasks.types import (
    ModelInfo,
    ProgressFn,
    SampledSequence,
    SampleOutput,
    SamplingParams,
    TokenSink,
    TokenStep,
)

log = logging.getLogger(__name__)
MAX_NUM_SAMPLES = 1024


@dataclass(frozen=True)
class StopRule:
    token_ids: tuple[int, ...]
    strings: tuple[str, ...]


def _invalid(message: str, key: str) -> InvalidRequest:
    return InvalidRequest(message, errors={key: [message]})


def check_request(
    prompt: Sequence[int],
    num_samples: int,
    params: SamplingParams,
    info: ModelInfo,
    can_decode: bool,
) -> tuple[list[int], StopRule]:
    """Validate a sample request; return the prompt as ints and the stop rule."""
    tokens = token_array(prompt, info.vocab_size, "prompt_tokens").tolist()
    check_length(len(tokens), info.max_context, "prompt_tokens")
    if not isinstance(num_samples, int) or not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise _invalid(f"num_samples must be an integer in [1, {MAX_NUM_SAMPLES}]", "num_samples")
    check_sampling_params(params)
    if len(tokens) + params.max_tokens > info.max_context:
        raise _invalid(
            f"prompt ({len(tokens)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
            f"model's context of {info.max_context}",
            "max_tokens",
        )
    return tokens, stop_rule(params.stop, info, can_decode)


def stop_rule(stop: Sequence[str | int] | None, info: ModelInfo, can_decode: bool) -> StopRule:
    """``None`` -> EOS only; ``()`` -> nothing; otherwise the given ids/strings plus EOS."""
    eos = () if info.eos_token_id is None else (info.eos_token_id,)
    if stop is None:
        return StopRule(eos, ())
    if isinstance(stop, (str, bytes)) or not isinstance(stop, Sequence):
        raise _invalid("stop must be a list of strings and/or token ids", "stop")
    if len(stop) == 0:
        return StopRule((), ())
    ids, strings = set(eos), []
    for item in stop:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise _invalid(f"stop entry {item!r} is neither a string nor a token id", "stop")
        if isinstance(item, str):
            if not item:
                raise _invalid("stop strings must be non-empty", "stop")
            strings.append(item)
        elif not 0 <= item < info.vocab_size:
            raise _invalid(f"stop token id {item} is outside the vocabulary", "stop")
        else:
            ids.add(item)
    if strings and not can_decode:
        raise _invalid("this model has no tokenizer, so stop strings cannot be used", "stop")
    return StopRule(tuple(sorted(ids)), tuple(strings))


def _filter(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k and then the top-p nucleus with -inf.

    A stable sort ranks tied logits by token id, so ``top_k=1`` keeps exactly the token that
    greedy decoding (``argmax``: the first maximum) picks. The most likely token is always
    kept, however small ``top_p`` is (even one that rounds to 0 in float32).
    """
    use_k = 0 < top_k < scaled.shape[-1]
    if not use_k and top_p >= 1.0:
        return scaled
    ordered, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    drop = torch.zeros_like(ordered, dtype=torch.bool)
    if use_k:
        drop[..., top_k:] = True
    if top_p < 1.0:
        probs = torch.softmax(ordered.masked_fill(drop, float("-inf")), dim=-1)
        drop |= (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop[..., 0] = False
    return scaled.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``, shifted so that each row's maximum is 0.

    Shifting first keeps every finite temperature > 0 safe: the maximum stays exactly 0 and
    the others go to -inf at worst, never NaN (0 / tiny is 0, x / tiny is -inf), so a
    temperature too small to divide by behaves as greedy (ties shared evenly). The softmax of
    the result is the same as that of ``logits / temperature``.
    """
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    scaled = shifted / temperature
    # A temperature that rounds to 0 in float32 gives 0 / 0 = NaN at the maximum: it is 0.
    return torch.nan_to_num(scaled, nan=0.0, posinf=0.0, neginf=float("-inf"))


Top = tuple[torch.Tensor, torch.Tensor]  # ([B, k] float32 logprobs, [B, k] int64 token ids)


def pick(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, Top | None]:
    """Next token per row of float32 ``logits`` [B, V], its (pre-filter) logprob, and (with
    ``params.top_logprobs`` k > 0) the k largest logprobs of that same distribution with
    their token ids, largest first."""
    if params.temperature == 0:
        token = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1)
    else:
        scaled = scale(logits, params.temperature)
        logprobs = torch.log_softmax(scaled, dim=-1)
        probs = torch.softmax(_filter(scaled, params.top_k, params.top_p), dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    # A multi-GPU worker: every rank takes rank 0's token (the ranks' logits could differ in
    # the last bit), so all feed the same tokens to the next step and stop together.
    token = lockstep.agree(token)
    top = None
    k = min(params.top_logprobs, logprobs.shape[-1])
    if k > 0:
        values, ids = torch.topk(logprobs, k, dim=-1)
        top = (values, ids)
    return token, lockstep.agree(logprobs.gather(1, token.unsqueeze(1)).squeeze(1)), top


def top_pairs(top: Top | None) -> list[list[tuple[int, float]]] | None:
    """``pick``'s top-k as one list of (token id, logprob) pairs per row (a device sync)."""
    if top is None:
        return None
    values, ids = top[0].cpu().tolist(), top[1].cpu().tolist()
    return [list(zip(i, v, strict=True)) for i, v in zip(ids, values, strict=True)]


def publish(
    sink: TokenSink,
    index: int,
    token: torch.Tensor,
    token_lp: torch.Tensor,
    top: Top | None,
    stopped: torch.Tensor,
) -> bool:
    """Hand token ``index`` of each row (``pick``'s outputs) to ``sink``, None for the rows
    that had ``stopped`` before it (a device sync). True: the consumer is gone. A sink that
    raises is logged and taken as still there (the result is stored as usual at the end)."""
    gone = stopped.tolist()
    pairs = top_pairs(top)
    step = TokenStep(
        index,
        [None if g else t for t, g in zip(token.tolist(), gone, strict=True)],
        [None if g else lp for lp, g in zip(token_lp.tolist(), gone, strict=True)],
        None if pairs is None else [None if g else p for p, g in zip(pairs, gone, strict=True)],
    )
    try:
        return bool(sink(step))
    except Exception:
        log.warning("streaming a decode step failed", exc_info=True)
        return False


def sequence_logprobs(
    model: nn.Module, tokens: list[int], device: torch.device, chunk_elements: int
) -> list[float | None]:
    """One logprob per token of ``tokens`` (None at position 0), one forward pass."""
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        return _prompt_logprobs(logits[0], ids[0], chunk_elements)


def _prompt_logprobs(
    logits: torch.Tensor, ids: torch.Tensor, chunk_elements: int
) -> list[float | None]:
    values = target_logprobs(logits[:-1], ids[1:], chunk_elements).cpu().tolist()
    return [None, *values]


def _cache_of(out: Any) -> Any:
    for key in ("cache", "past_key_values"):
        cache = getattr(out, key, None)
        if cache is not None:
            return cache
    raise RuntimeError("the model returned no KV cache")


def _string_hits(
    history: list[list[int]], finished: list[bool], strings: tuple[str, ...], decode
) -> list[bool]:
    window = max(len(s.encode("utf-8")) for s in strings) + 2
    hits = []
    for seq, done in zip(history, finished, strict=True):
        if done:
            hits.append(False)
            continue
        text = decode(seq[-window:])
        hits.append(any(s in text for s in strings))
    return hits


def generate(
    model: nn.Module,
    cache_kwarg: str,
    prompt: list[int],
    num_samples: int,
    params: SamplingParams,
    stop: StopRule,
    *,
    decode: Callable[[list[int]], str] | None,
    generator: torch.Generator,
    deadline: float,
    want_prompt_logprobs: bool,
    chunk_elements: int,
    progress: ProgressFn | None = None,
    sink: TokenSink | None = None,
) -> SampleOutput:
    """Sample ``num_samples`` continuations of ``prompt`` in one batched KV-cache loop.

    ``progress`` gets the ``prefill`` and ``decode`` phases, then the tokens generated per
    sequence at most every 0.5 s (see ``engine.progress``). ``sink`` gets every step's tokens
    as they are sampled (``publish``); when it answers that its consumer is gone, the loop
    ends and raises ``RequestCancelled``.
    """
    device = generator.device
    n, max_tokens = num_samples, params.max_tokens
    ticker = Ticker(progress)

    def check_deadline() -> None:
        if lockstep.agree_flags([time.monotonic() > deadline])[0]:
            raise OperationTimeout("sampling ran past its deadline", errors={"sample": ["timeout"]})

    with torch.no_grad():
        check_deadline()
        ticker.phase("prefill", tokens_total=len(prompt), sequences=n)
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=0 if want_prompt_logprobs else 1)
        prompt_lps = (
            _prompt_logprobs(out.logits[0], ids[0], chunk_elements)
            if want_prompt_logprobs
            else None
        )
        cache = _cache_of(out)
        logits = out.logits[:, -1, :].float()
        if n > 1:
            if hasattr(cache, "batch_repeat_interleave"):
                cache.batch_repeat_interleave(n)
            else:  # older caches: prefill the repeated prompt instead
                out = model(input_ids=ids.expand(n, -1), use_cache=True, logits_to_keep=1)
                cache = _cache_of(out)
            logits = logits.expand(n, -1)

        tokens = torch.empty((n, max_tokens), dtype=torch.long, device=device)
        logprobs = torch.empty((n, max_tokens), dtype=torch.float32, device=device)
        tops: list[Top | None] = []
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        kept = torch.full((n,), max_tokens, dtype=torch.long, device=device)
        stop_ids = torch.tensor(stop.token_ids, dtype=torch.long, device=device)
        history: list[list[int]] = [[] for _ in range(n)]
        ticker.phase("decode", tokens_done=0, tokens_total=max_tokens, sequences=n)

        def count_finished() -> int:  # a device sync: only when a report is made
            return int(finished.sum())

        for step in range(max_tokens):
            check_deadline()
            token, token_lp, top = pick(logits, params, generator)
            tokens[:, step] = token
            logprobs[:, step] = token_lp
            tops.append(top)
            gone = sink is not None and publish(sink, step, token, token_lp, top, finished)
            if lockstep.active() is not None:  # only rank 0 streams: all end with rank 0
                gone = lockstep.agree_flags([gone])[0]
            if gone:
                raise RequestCancelled("the stream's consumer went away")
            hit = torch.isin(token, stop_ids)
            if stop.strings:
                assert decode is not None
                for seq, t in zip(history, token.tolist(), strict=True):
                    seq.append(t)
                done = finished.tolist()
                hit |= torch.tensor(
                    _string_hits(history, done, stop.strings, decode), device=device
                )
            new = hit & ~finished
            kept = torch.where(new, step + 1, kept)
            finished |= new
            if step + 1 == max_tokens or bool(finished.all()):
                break
            ticker.tick(step + 1, count_finished)
            out = model(input_ids=token.unsqueeze(1), use_cache=True, **{cache_kwarg: cache})
            cache = _cache_of(out)
            logits = out.logits[:, -1, :].float()

    lengths, done = kept.tolist(), finished.tolist()
    token_rows, lp_rows = tokens.cpu().tolist(), logprobs.cpu().tolist()
    top_rows = rows_of_tops(tops, n)
    sequences = [
        SampledSequence(
            tokens=token_rows[i][: lengths[i]],
            logprobs=lp_rows[i][: lengths[i]],
            stop_reason="stop" if done[i] else "length",
            top_logprobs=None if top_rows is None else top_rows[i][: lengths[i]],
        )
        for i in range(n)
    ]
    return SampleOutput(sequences=sequences, prompt_logprobs=prompt_lps)


def rows_of_tops(tops: Sequence[Top | None], n: int) -> list[list[list]] | None:
    """Per-step top-k (``pick``) as, per row, one list of (id, logprob) pairs per token."""
    if not tops or tops[0] is None:
        return None
    values = torch.stack([t[0] for t in tops if t is not None], dim=1).cpu().tolist()
    ids = torch.stack([t[1] for t in tops if t is not None], dim=1).cpu().tolist()
    return [
        [list(zip(i, v, strict=True)) for i, v in zip(ids[row], values[row], strict=True)]
        for row in range(n)
    ]
