"""Server-sent events for ``stream: true``: tokens as the worker samples them.

The worker appends each decode step of the request to its Redis stream (``token_stream``);
this generator reads it with a blocking ``XREAD`` (at most ``POLL_S`` at a time, so it also
notices a failed future, a client gone, or its deadline), turns new tokens into text
(``RowText``: never a partial character or a possible stop string) and sends one chunk per
read. The future stays the authority: when the request ends, the final result fills in
anything the stream did not carry. A client that goes away (the next write fails: gunicorn
closes the generator) sets the request's cancel flag, and the worker's decode loop ends it.
A web process that stops (Ctrl-C, SIGTERM) ends its streams within ``POLL_S`` the same way,
with an error event (503: send the request again) and ``[DONE]``, so it exits promptly and
no worker decodes on for a client it can no longer answer.

Every wait has a bound; the web thread waits, no worker does. No model code runs here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import redis

from eztinker_tasks import token_stream
from eztinker_web.auth import Caller
from eztinker_web.futures.status import future_status
from eztinker_web.openai.errors import openai_error
from eztinker_web.openai.responses import Reply, finish_reason
from eztinker_web.openai.text import RowText
from eztinker_web.services import Services

log = logging.getLogger(__name__)

POLL_S = 1.0  # the longest XREAD block: between two, the future and the client are checked


def event(body: dict[str, Any] | str) -> str:
    data = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
    return f"data: {data}\n\n"


def failure_event(error: dict[str, Any], status: int) -> str:
    return event(openai_error(status, error.get("message", "error"), error.get("code"), None))


def sse(
    svc: Services,
    who: Caller,
    reply: Reply,
    rows: list[RowText],
    timeout_s: float,
    status_of: Any,
) -> Iterator[str]:
    """The event stream of a submitted request (``reply.future_id``), ending ``[DONE]``."""
    client = svc.redis_client
    future_id = reply.future_id
    key = token_stream.stream_key(future_id)
    last = "0-0"
    deadline = time.monotonic() + timeout_s
    complete = False
    try:
        if reply.request.chat:
            yield event(reply.role_chunk())
        while True:
            ended = False
            entries: Any = client.xread({key: last}, count=512, block=int(POLL_S * 1000))
            for _, items in entries or []:
                for entry_id, fields in items:
                    last = entry_id
                    if b"end" in fields:
                        ended = True
                    elif b"s" in fields:
                        for step in json.loads(fields[b"s"]):
                            _feed(rows, step)
            choices = []
            for i, row in enumerate(rows):
                piece = row.take(final=False)
                if piece.text or piece.tokens:
                    choices.append(reply.chunk_choice(i, row, piece))
            if choices:
                yield event(reply.chunk(choices))
            body = None
            if ended:
                body = future_status(svc, future_id, 5.0, caller=who)
            elif not entries:
                body = future_status(svc, future_id, 0.0, caller=who)
                if body["status"] not in ("succeeded", "failed"):
                    yield ": waiting\n\n"  # a write: it fails once the client is gone
            if body is not None and body["status"] in ("succeeded", "failed"):
                yield from _final(reply, rows, body, status_of)
                break
            if svc.closing:  # this process is stopping: nobody will send the rest
                token_stream.cancel(client, future_id)
                error = {
                    "message": "the server is stopping: send the request again",
                    "code": "service_unavailable",
                }
                yield failure_event(error, 503)
                break
            if time.monotonic() > deadline:
                token_stream.cancel(client, future_id)  # nobody will read the rest
                error = {"message": f"no result within {timeout_s:g} s", "code": "timeout"}
                yield failure_event(error, 504)
                break
        yield event("[DONE]")
        complete = True
    finally:
        if not complete:  # the client went away (or this failed): stop the generation
            try:
                token_stream.cancel(client, future_id)
            except redis.RedisError:
                log.warning("could not cancel %s", future_id)


def _feed(rows: list[RowText], step: dict[str, Any]) -> None:
    tops = step.get("top")
    for i, (token, logprob) in enumerate(zip(step["t"], step["l"], strict=True)):
        if token is not None and i < len(rows) and len(rows[i].tokens) == step["i"]:
            rows[i].add([token], [logprob], [tops[i]] if tops and tops[i] is not None else None)


def _final(
    reply: Reply, rows: list[RowText], body: dict[str, Any], status_of: Any
) -> Iterator[str]:
    """The last chunks from the future's result (or its error)."""
    if body["status"] == "failed":
        error = body["error"] or {}
        yield failure_event(error, status_of(error.get("code")))
        return
    sequences = body["result"]["sequences"]
    reply.prompt_tokens = len(body["result"]["prompt_tokens"])
    choices = []
    for i, (row, seq) in enumerate(zip(rows, sequences, strict=True)):
        have = len(row.tokens)
        if have < len(seq["tokens"]) and row.cut is None:
            row.add(
                seq["tokens"][have:],
                seq["logprobs"][have:],
                (seq.get("top_logprobs") or [])[have:] or None,
            )
        piece = row.take(final=True)
        choices.append(reply.chunk_choice(i, row, piece, finish_reason(seq["stop_reason"], row)))
    total = sum(len(s["tokens"]) for s in sequences)
    yield event(reply.chunk(choices))
    if reply.request.include_usage:
        yield event({**reply.chunk([]), "usage": reply.usage(total)})
