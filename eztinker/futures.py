"""Futures: every operation returns one at once; its result is fetched by long-polling.

``APIFuture.result()`` polls ``GET /v1/futures/<id>?wait=...`` until the operation succeeds
(the result, converted to its type) or fails (the server's error raised as an
``EZTinkerAPIError``). ``await future`` does the same without blocking the event loop.
While it waits, ``future.progress()`` says where it is (a ``FutureProgress``: its place in the
queue, or its phase and tokens done), and ``result(on_progress=fn)`` calls ``fn`` with that
about every ``progress_interval_s`` seconds.

``OrderedSubmitter`` keeps a client's submissions in call order: sync and ``*_async`` calls
alike go through one background thread, so the server's queue sees them in the order the
training loop made them, and a ``*_async`` call has queued its request before it returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Generic, TypeVar

from eztinker.errors import EZTinkerAPIError, from_envelope
from eztinker.transport import Transport

T = TypeVar("T")

POLL_WAIT_S = 25.0  # the server allows up to 30 s per long poll
ASYNC_POLL_WAIT_S = 5.0  # shorter, so a cancelled await frees its thread soon
PROGRESS_INTERVAL_S = 0.5  # how often result(on_progress=...) reports (the server's own pace)


@dataclass(frozen=True)
class FutureProgress:
    """Where an unfinished operation is, as the server last saw it.

    ``status`` is ``pending`` (queued) or ``running``. ``phase``: ``queued``; ``running`` (no
    finer phase known: a short operation, or one that reports none); ``prefill`` and ``decode``
    (sampling); ``forward`` and ``backward`` (a loss pass). Queued: ``ops_ahead`` operations wait
    before it in its queue (None: unknown, e.g. its worker is taking it now) of
    ``queue_length``. ``decode``: ``tokens_done`` of ``tokens_total`` (max_tokens) generated per
    sequence, for ``sequences`` samples, ``sequences_finished`` of them stopped; ``prefill``:
    ``tokens_total`` prompt tokens; ``forward``/``backward``: ``tokens_total`` tokens in
    ``sequences`` datums. Seconds: ``queued_s`` waited in the queue, ``elapsed_s`` running.
    Workers publish progress about every 0.5 s, once an operation has run for 0.5 s.
    """

    status: str
    phase: str
    ops_ahead: int | None = None
    queue_length: int | None = None
    tokens_done: int | None = None
    tokens_total: int | None = None
    sequences: int | None = None
    sequences_finished: int | None = None
    queued_s: float = 0.0
    elapsed_s: float = 0.0

    @property
    def fraction(self) -> float | None:
        """``tokens_done / tokens_total`` while decoding, else None."""
        if self.tokens_done is None or not self.tokens_total:
            return None
        return min(1.0, self.tokens_done / self.tokens_total)

    @classmethod
    def from_json(cls, status: str, body: Mapping[str, Any] | None) -> FutureProgress:
        body = body or {}
        known = {f.name for f in fields(cls)} - {"status"}
        values = {k: body[k] for k in known if body.get(k) is not None}
        values.setdefault("phase", "running" if status == "running" else "queued")
        return cls(status=status, **values)


def _with_timing(value: Any, timing: dict[str, Any] | None) -> Any:
    """The result with ``timing`` filled in, where its type has such a field."""
    if timing is not None and is_dataclass(value) and "timing" in {f.name for f in fields(value)}:
        return replace(value, timing=timing)
    return value


class APIFuture(Generic[T]):
    """The future of one server-side operation (Tinker's ``APIFuture``)."""

    def __init__(
        self,
        transport: Transport,
        future_id: str,
        convert: Callable[[Any], T] = lambda r: r,
        *,
        op: str | None = None,
        run_id: str | None = None,
        seq_id: int | None = None,
    ) -> None:
        self._transport = transport
        self.future_id = future_id
        self.op = op
        self.run_id = run_id
        self.seq_id = seq_id
        self._convert = convert
        self._lock = threading.Lock()
        self._done = False
        self._value: Any = None
        self._error: EZTinkerAPIError | None = None
        self._status = "pending"
        self._progress: FutureProgress | None = FutureProgress("pending", "queued")
        # Once done: ``queued_ms`` and ``run_ms`` (and ``in_pass_of``: the future whose engine
        # pass ran this call, when it shared another call's pass).
        self.timing: dict[str, Any] | None = None

    # -- polling ---------------------------------------------------------------------------
    def _poll(self, wait: float) -> bool:
        """Ask the server once (long-polling up to ``wait`` s); True when the op is done."""
        if self._done:
            return True
        wait = max(0.0, min(wait, 30.0))
        body = self._transport.request(
            "GET",
            f"/v1/futures/{self.future_id}",
            params={"wait": round(wait, 3)},
            timeout=self._transport.timeout + wait,
        )
        status = body.get("status", "pending")
        with self._lock:
            if self._done:
                return True
            self._status = status
            if self.op is None and isinstance(body.get("op"), str):
                self.op = body["op"]
            if status in ("succeeded", "failed") and isinstance(body.get("timing"), dict):
                self.timing = dict(body["timing"])
            if status == "succeeded":
                self._value = _with_timing(self._convert(body.get("result")), self.timing)
                self._done = True
            elif status == "failed":
                self._error = from_envelope(body.get("error") or {}, future_id=self.future_id)
                self._done = True
            self._progress = (
                None if self._done else FutureProgress.from_json(status, body.get("progress"))
            )
        return self._done

    def _outcome(self) -> T:
        if self._error is not None:
            raise self._error
        return self._value

    def status(self) -> str:
        """``pending``, ``running``, ``succeeded`` or ``failed`` (asks the server if not done)."""
        self._poll(0)
        return self._status

    def done(self) -> bool:
        """True once the operation finished (successfully or not)."""
        return self._poll(0)

    def progress(self) -> FutureProgress | None:
        """Where the operation is now (asks the server); None once it is done."""
        self._poll(0)
        return self._progress

    def result(
        self,
        timeout: float | None = None,
        *,
        on_progress: Callable[[FutureProgress], None] | None = None,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
    ) -> T:
        """Wait for the result; raise the operation's error, or TimeoutError after ``timeout``.

        ``on_progress`` is called with a ``FutureProgress`` about every ``progress_interval_s``
        seconds while the operation is unfinished (each call is one long-poll that returns at
        once when the operation finishes, so waiting this way costs no extra latency).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        poll_s = POLL_WAIT_S if on_progress is None else max(0.05, progress_interval_s)
        while True:
            wait = poll_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 and not self._done:
                    if self._poll(0):
                        break
                    raise TimeoutError(f"operation {self.future_id} not done after {timeout} s")
                wait = min(wait, max(left, 0.0))
            if self._poll(wait):
                break
            self._report(on_progress)
        return self._outcome()

    def _report(self, on_progress: Callable[[FutureProgress], None] | None) -> None:
        progress = self._progress
        if on_progress is not None and progress is not None and not self._done:
            on_progress(progress)

    async def result_async(
        self,
        timeout: float | None = None,
        *,
        on_progress: Callable[[FutureProgress], None] | None = None,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
    ) -> T:
        """``result()`` for asyncio: polls in a worker thread, never blocking the loop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poll_s = ASYNC_POLL_WAIT_S if on_progress is None else max(0.05, progress_interval_s)
        while not self._done:
            wait = poll_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    if await asyncio.to_thread(self._poll, 0):
                        break
                    raise TimeoutError(f"operation {self.future_id} not done after {timeout} s")
                wait = min(wait, left)
            if not await asyncio.to_thread(self._poll, wait):
                self._report(on_progress)
        return self._outcome()

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()

    def __repr__(self) -> str:
        return f"APIFuture({self.future_id!r}, op={self.op!r}, status={self._status!r})"


class Submission(Generic[T]):
    """What a ``*_async`` method returns: its request is already queued; ``await`` it for the
    value (for operations, an ``APIFuture``: Tinker's double await,
    ``fut = await tc.forward_backward_async(...); result = await fut``)."""

    def __init__(self, pending: concurrent.futures.Future[T]) -> None:
        self._pending = pending

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.wrap_future(self._pending).__await__()

    def result(self, timeout: float | None = None) -> T:
        """Block until submitted (for use outside asyncio)."""
        return self._pending.result(timeout)


class OrderedSubmitter:
    """Runs submit calls one at a time, in call order, on one background thread."""

    def __init__(self, name: str = "eztinker-submit") -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name
        )

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        return self._executor.submit(fn)

    def call(self, fn: Callable[[], T]) -> T:
        """Queue ``fn`` behind earlier submissions and wait until it has run."""
        return self._executor.submit(fn).result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
