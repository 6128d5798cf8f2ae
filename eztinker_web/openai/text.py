"""A sampled sequence as OpenAI text: decoded incrementally, cut before a stop string.

``RowText`` takes a sequence's tokens as they arrive (all at once for a plain response, a few
per decode step when streaming) and hands out the text that is final: never a trailing
partial UTF-8 character, never text that could still turn out to begin a stop string, and
nothing from the first stop string on (OpenAI leaves the stop sequence out). The same class
builds both responses, so streamed pieces join to exactly the non-streamed text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence


@dataclass
class Piece:
    """Text handed out at once, with the tokens that begin in it (their indices)."""

    text: str
    tokens: range


@dataclass
class RowText:
    decode: Callable[[list[int]], str]  # token ids -> text, special tokens left out
    stops: Sequence[str] = ()
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # where each token's text begins
    text: str = ""
    cut: int | None = None  # where the first stop string begins, once seen
    sent_chars: int = 0
    sent_tokens: int = 0

    def add(
        self,
        tokens: Sequence[int],
        logprobs: Sequence[float],
        top_logprobs: Sequence[Sequence[tuple[int, float]]] | None = None,
    ) -> None:
        """Append sampled tokens, their logprobs and top-k pairs (ignored once a stop string
        was seen)."""
        for k, token in enumerate(tokens):
            if self.cut is not None:
                return
            self.starts.append(len(self.text.removesuffix(REPLACEMENT)))
            self.tokens.append(token)
            self.logprobs.append(logprobs[k])
            self.top_logprobs.append([tuple(p) for p in top_logprobs[k]] if top_logprobs else [])
            self.text = self.decode(self.tokens)
            found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
            if found:
                self.cut = min(found)

    def _safe_end(self) -> int:
        """How much of the text no later token can change or cut."""
        text = self.text
        end = len(text.rstrip(REPLACEMENT))
        for stop in self.stops:  # hold back a tail that may begin a stop string
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[end - k : end] == stop[:k]:
                    end -= k
                    break
        return end

    def take(self, final: bool) -> Piece:
        """The text (and tokens) not handed out yet that can be now; ``final``: all of it."""
        end = self.cut if self.cut is not None else len(self.text) if final else self._safe_end()
        end = max(end, self.sent_chars)
        piece = self.text[self.sent_chars : end]
        self.sent_chars = end
        first = self.sent_tokens
        last = first
        while last < len(self.tokens) and (self.starts[last] < end or (final and self.cut is None)):
            last += 1
        self.sent_tokens = last
        return Piece(piece, range(first, last))

    @property
    def stopped_by_string(self) -> bool:
        return self.cut is not None
