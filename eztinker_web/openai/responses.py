"""OpenAI response objects: completions and chat, whole or as stream chunks.

A choice's text and logprobs come from its ``RowText`` (``text``); a token's own text is its
id decoded alone with special tokens shown (``<|endoftext|>``), as OpenAI shows them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eztinker_web.openai.schemas import GenerationRequest
from eztinker_web.openai.text import Piece, RowText

TokenText = Callable[[int], str]


@dataclass
class Reply:
    """What every object of one response shares."""

    request: GenerationRequest
    future_id: str
    token_text: TokenText
    prompt_tokens: int | None  # None until the result says (the worker tokenized the text)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.request.chat else "cmpl-") + self.future_id.removeprefix("fut_")

    def _object(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.request.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def usage(self, completion_tokens: int) -> dict[str, int]:
        prompt = self.prompt_tokens or 0
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }

    def logprobs(self, row: RowText, piece: Piece) -> dict[str, Any] | None:
        """The logprobs of ``piece``'s tokens, in the endpoint's own shape (None if not asked)."""
        if not self.request.logprobs:
            return None
        ks = piece.tokens
        if self.request.chat:

            def entry(token: int, logprob: float) -> dict[str, Any]:
                text = self.token_text(token)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

            return {
                "content": [
                    {
                        **entry(row.tokens[k], row.logprobs[k]),
                        "top_logprobs": [entry(t, lp) for t, lp in row.top_logprobs[k]],
                    }
                    for k in ks
                ]
            }
        tops = None
        if self.request.top_logprobs:
            tops = [{self.token_text(t): lp for t, lp in row.top_logprobs[k]} for k in ks]
        return {
            "tokens": [self.token_text(row.tokens[k]) for k in ks],
            "token_logprobs": [row.logprobs[k] for k in ks],
            "top_logprobs": tops,
            "text_offset": [row.starts[k] for k in ks],
        }

    def _choice(
        self, index: int, row: RowText, piece: Piece, finish: str | None, whole: bool
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"index": index}
        if not self.request.chat:
            out["text"] = piece.text
        elif whole:
            out["message"] = {"role": "assistant", "content": piece.text, "refusal": None}
        else:
            out["delta"] = {"content": piece.text} if piece.text else {}
        out["logprobs"] = self.logprobs(row, piece)
        out["finish_reason"] = finish
        return out

    def chunk_choice(
        self, index: int, row: RowText, piece: Piece, finish: str | None = None
    ) -> dict[str, Any]:
        """A choice of a streamed chunk: the new text (and its tokens' logprobs)."""
        return self._choice(index, row, piece, finish, whole=False)

    def whole(self, rows: list[RowText], finishes: list[str]) -> dict[str, Any]:
        """The non-streamed response."""
        choices = [
            self._choice(i, row, row.take(final=True), finish, whole=True)
            for i, (row, finish) in enumerate(zip(rows, finishes, strict=True))
        ]
        body = self._object("chat.completion" if self.request.chat else "text_completion", choices)
        body["usage"] = self.usage(sum(len(r.tokens) for r in rows))
        return body

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict:
        """One streamed chunk."""
        body = self._object(
            "chat.completion.chunk" if self.request.chat else "text_completion", choices
        )
        if self.request.include_usage:
            body["usage"] = usage
        return body

    def role_chunk(self) -> dict[str, Any]:
        """Chat streams open with the assistant's role, one delta per choice."""
        choices = [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}
            for i in range(self.request.n)
        ]  # fmt: skip
        return self.chunk(choices)


def finish_reason(stop_reason: str, row: RowText) -> str:
    """OpenAI's ``finish_reason``: ``stop`` (EOS or a stop string) or ``length``."""
    return "stop" if stop_reason == "stop" or row.stopped_by_string else "length"
