"""Samples on a worker decode together: those waiting when one starts, and those arriving
while it runs (continuous batching), in ONE decode batch.

When a ``sample`` task starts on a worker, the sample messages waiting at the head of the
queue it came from join it, and while it decodes the worker looks again (every 50 ms, until
the lead ends; ``Settings.sample_batch_max`` requests in all) and new ones join the running
batch at its next step. The queue is the shared sample queue (base models and saved
checkpoints, any mix) or, for a run's live weights, that run's own queue (only the samples
right at its head, so none overtakes a training op submitted before it). The engine decodes
them together (``Engine.sample_many``): each request gets exactly the result it would get
alone, stored under its own future as soon as it ends.

Claiming a waiting message is atomic (a Lua script: ``LREM`` of the exact message, then the
start marker of its future naming this worker and the lead task's pass), so a message another
worker has already taken is skipped, and a claimed request never hangs: its result or error
is stored when it ends or when the batch fails, and if the worker dies the future's start
marker makes the web report ``worker_gone``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import redis

from eztinker_tasks import names
from eztinker_tasks.coalesce import decode_message
from eztinker_tasks.errors import EZTinkerError, InternalError, OperationFailed
from eztinker_tasks.result_backend import ResultBackend
from eztinker_tasks.runtime import WorkerRuntime
from eztinker_tasks.store_records import _text
from eztinker_tasks.token_stream import RedisTokenSink
from eztinker_tasks.types import SampleCall, SampleOutput, SampleSource, SamplingParams

log = logging.getLogger(__name__)

# KEYS: the queue, the future's start-marker key; ARGV: the message, the marker, its TTL (s).
CLAIM = """
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 1 then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', tonumber(ARGV[3]))
  return 1
end
return 0
"""


@dataclass(frozen=True)
class SampleRequest:
    """A ``sample`` task's arguments (the starting one's, or a waiting message's)."""

    task_id: str
    source: SampleSource
    num_samples: int
    params: SamplingParams
    prompt_tokens: list[int] | None = None
    prompt_text: str | None = None
    prompt_logprobs: bool = False
    stream: bool = False  # publish its tokens as they are sampled (``token_stream``)
    raw: bytes = b""  # the message as it sits in its queue ("" for the starting task)


def head_samples(
    oldest_last: Sequence[bytes],
    run_id: str | None,
    max_requests: int,
    same_base: Callable[[SampleSource], bool] = lambda source: True,
) -> list[SampleRequest]:
    """The ``sample`` messages at the head of a queue (``LRANGE q -n -1``), oldest first.

    Stops at the first message that is another operation, malformed, on another base
    (``same_base``), or (``run_id`` given) not a sample of that run's live weights; ``run_id``
    None takes samples of bases and checkpoints only.
    """
    found: list[SampleRequest] = []
    for raw in reversed(oldest_last):
        if len(found) >= max_requests:
            break
        decoded = decode_message(raw)
        if decoded is None or decoded[0] != names.SAMPLE:
            break
        _, task_id, kwargs = decoded
        try:
            source = SampleSource.from_dict(kwargs["source"])
            params = SamplingParams.from_dict(kwargs["params"])
            request = SampleRequest(
                task_id=task_id,
                source=source,
                num_samples=kwargs["num_samples"],
                params=params,
                prompt_tokens=kwargs.get("prompt_tokens"),
                prompt_text=kwargs.get("prompt_text"),
                prompt_logprobs=bool(kwargs.get("prompt_logprobs", False)),
                stream=bool(kwargs.get("stream", False)),
                raw=raw,
            )
        except (KeyError, TypeError, ValueError):
            break
        if source.run_id != run_id or not same_base(source):
            break
        found.append(request)
    return found


def claim(
    rt: WorkerRuntime, queue: str, waiting: Sequence[SampleRequest], lead_task_id: str, at: float
) -> list[SampleRequest]:
    """Take ``waiting`` out of ``queue`` (one round trip); those another worker took are left."""
    if not waiting:
        return []
    started = json.dumps({"at": at, "worker": rt.worker_name, "pass": lead_task_id})
    ttl = int(rt.settings.result_ttl_s)
    script = rt.store.r.register_script(CLAIM)
    pipe = rt.store.r.pipeline(transaction=False)
    for request in waiting:
        marker = rt.store.future_key(request.task_id) + ":started"
        script(keys=[queue, marker], args=[request.raw, started, ttl], client=pipe)
    try:
        taken = pipe.execute()
    except redis.RedisError:
        # Some scripts may have run before the connection failed: those messages are gone
        # from the queue, and their start markers (this exact one) tell which.
        markers = [rt.store.future_key(r.task_id) + ":started" for r in waiting]
        found = rt.store.r.mget(markers)
        taken = [1 if m is not None and _text(m) == started else 0 for m in found]
        if any(taken):
            log.warning("claimed %d samples through a failing connection", sum(taken))
    return [r for r, ok in zip(waiting, taken, strict=True) if ok == 1]


def base_of(rt: WorkerRuntime, source: SampleSource) -> str | None:
    """The base model of a sample's source, cheaply (no checkpoint directory scan): None
    where it is not known."""
    if source.base_model:
        return source.base_model
    run_id = source.run_id or (source.checkpoint or "").split("/", 1)[0]
    if rt.engine.has_run(run_id):
        return rt.engine.run_info(run_id).base_model
    record = rt.store.get_run(run_id)
    return None if record is None else record.base_model


def gather(
    rt: WorkerRuntime, lead: SampleRequest, base: str, at: float, most: int
) -> list[SampleRequest]:
    """Claim up to ``most`` samples on ``base`` waiting at the head of ``lead``'s queue."""
    if most <= 0:
        return []
    run_id = lead.source.run_id
    queue = names.run_queue(run_id) if run_id else names.SAMPLE_QUEUE
    head = rt.store.queue_heads([queue], most).get(queue, [])

    def same_base(source: SampleSource) -> bool:
        return base_of(rt, source) == base

    return claim(rt, queue, head_samples(head, run_id, most, same_base), lead.task_id, at)


class Batch:
    """The requests of one decode batch on a worker: the lead, those waiting behind it when
    it started, and those that arrive while it runs (until the lead ends, at most
    ``Settings.sample_batch_max`` in all). ``outcomes[i]`` is request ``i``'s result dict or
    ``EZTinkerError``, set as it ends; ``on_answer(i, outcome)`` is called then."""

    def __init__(
        self, rt: WorkerRuntime, lead: SampleRequest, on_answer: Callable[[int, Any], None]
    ) -> None:
        self.rt, self.lead, self.on_answer = rt, lead, on_answer
        self.requests: list[SampleRequest] = [lead]
        self.outcomes: dict[int, Any] = {}
        self._engine_index: list[int] = []  # the engine's request k is our request i
        self._prompts: dict[int, tuple[str, list[int]]] = {}  # i -> (base, prompt tokens)
        self._tracking: dict[int, ExitStack] = {}  # i -> its progress publication
        self._sinks: dict[int, RedisTokenSink] = {}  # i -> its token stream (streamed ones)
        self.unanswered: list[int] = []  # ended, but storing the answer failed (retried)
        self._base: str | None = None

    def run(self) -> None:
        """Decode the lead with what waits behind it, taking more while the lead runs."""
        rt = self.rt
        try:
            self._base = base_of(rt, self.lead.source)
            self.requests += self._gather()
            calls = self._calls(range(len(self.requests)))
            rt.engine.sample_many(calls, poll=self._poll, on_done=self._done)
        finally:
            for tracking in self._tracking.values():
                tracking.close()

    def _room(self) -> int:
        return self.rt.settings.sample_batch_max - len(self.requests)

    def _gather(self) -> list[SampleRequest]:
        if self._base is None or self._room() <= 0:
            return []
        return gather(self.rt, self.lead, self._base, time.time(), self._room())

    def _poll(self) -> list[SampleCall]:
        start = len(self.requests)
        try:
            self.requests += self._gather()
        except redis.RedisError:  # joining is best-effort: the batch goes on without them
            log.warning("could not read the queue for samples to join", exc_info=True)
            return []
        return self._calls(range(start, len(self.requests)))

    def _calls(self, indices: range) -> list[SampleCall]:
        """Engine calls of requests ``indices`` (a request that cannot be one is answered)."""
        from eztinker_tasks.sampling import base_model_of

        calls = []
        for i in indices:
            request = self.requests[i]
            try:
                base = base_model_of(self.rt, request.source)
                tokens = request.prompt_tokens
                if tokens is None:
                    self.rt.engine.model_info(base)  # writes a hub model's tokenizer first
                    tokens = self.rt.tokenizers.encode(base, request.prompt_text or "")
            except EZTinkerError as exc:
                self._answer(i, exc)
                continue
            tracking = ExitStack()
            report = tracking.enter_context(self.rt.progress.track([request.task_id]))
            self._tracking[i] = tracking
            self._prompts[i] = (base, list(tokens))
            self._engine_index.append(i)
            sink = None
            if request.stream:
                sink = self._sinks[i] = RedisTokenSink(self.rt.store.r, request.task_id)
            calls.append(
                SampleCall(
                    request.source,
                    tokens,
                    request.num_samples,
                    request.params,
                    request.prompt_logprobs,
                    progress=report,
                    sink=sink,
                )
            )
        return calls

    def _done(self, k: int, out: SampleOutput | EZTinkerError) -> None:
        from eztinker_tasks.sampling import result_of

        i = self._engine_index[k]
        if isinstance(out, EZTinkerError):
            self._answer(i, out)
        else:
            base, tokens = self._prompts[i]
            self._answer(i, result_of(self.rt, base, tokens, out))

    def _answer(self, i: int, outcome: Any) -> None:
        tracking = self._tracking.pop(i, None)
        if tracking is not None:
            tracking.close()  # its progress ends with it
        self.outcomes[i] = outcome
        try:
            self.on_answer(i, outcome)
        except Exception:  # the batch goes on; the answer is stored again at its end
            log.warning("could not store the answer of %s yet", self.requests[i].task_id)
            self.unanswered.append(i)
        if self.requests[i].stream:
            sink = self._sinks.pop(i, None)
            (sink or RedisTokenSink(self.rt.store.r, self.requests[i].task_id)).end()


def store_answers(
    rt: WorkerRuntime, backend: ResultBackend, answered: Sequence[tuple[SampleRequest, Any]]
) -> None:
    """Store each claimed request's result or error under its future (one MULTI/EXEC)."""
    if not answered:
        return
    ttl = int(rt.settings.result_ttl_s)
    with backend.client.pipeline(transaction=True) as pipe:
        for request, outcome in answered:
            if isinstance(outcome, BaseException):
                error = outcome if isinstance(outcome, EZTinkerError) else _server(outcome)
                key, value = backend.failure_record(request.task_id, OperationFailed.wrap(error))
            else:
                key, value = backend.result_record(request.task_id, outcome)
            rt.store.answer_call("", None, request.task_id, key, value, ttl, pipe)
        pipe.execute()


def _server(exc: BaseException) -> EZTinkerError:
    return InternalError(
        f"the sample batch this request ran in failed: {type(exc).__name__}: {exc}"
    )
