"""``RowText``: streamed pieces never hold a partial character or a possible stop string,
join to exactly the whole text, and end before the first stop string; with a real tokenizer."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest

from eztinker_tasks.tokenization import TokenizerCache
from eztinker_web.openai.text import RowText


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    cache = TokenizerCache(Path(tmp_path_factory.mktemp("data")))
    return cache, partial(cache.decode, "tiny-gpt2")


def stream(row: RowText, tokens: list[int]) -> list[str]:
    pieces = []
    for t in tokens:
        row.add([t], [0.0])
        pieces.append(row.take(final=False).text)
    pieces.append(row.take(final=True).text)
    return pieces


@pytest.mark.parametrize(
    ("text", "stops"),
    [
        ("The river ran slowly past the old mill.", ()),
        ("The river ran slowly past the old mill.", ("old",)),
        ("The river ran slowly past the old mill.", ("ol", "mill")),
        ("Café au lait — naïve résumé ☕ done", ("☕",)),
        ("Café au lait — naïve résumé ☕ done", ("zzz",)),
    ],
)
def test_pieces_join_to_the_text_cut_before_the_stop(tok, text: str, stops) -> None:
    cache, decode = tok
    tokens = cache.encode("tiny-gpt2", text)
    pieces = stream(RowText(decode, stops), tokens)
    found = [text.find(s) for s in stops if s in text]
    want = text[: min(found)] if found else text
    assert "".join(pieces) == want
    assert not any("\ufffd" in p for p in pieces)
    whole = RowText(decode, stops)
    whole.add(tokens, [0.0] * len(tokens))
    assert whole.take(final=True).text == want
    assert whole.stopped_by_string == bool(found)


def test_a_possible_stop_is_held_back_until_it_is_not(tok) -> None:
    cache, decode = tok
    row = RowText(decode, ("mill.",))
    for t in cache.encode("tiny-gpt2", "past the mil"):
        row.add([t], [0.0])
    assert not row.take(final=False).text.endswith("mil")  # may begin "mill."
    more = cache.encode("tiny-gpt2", "ky way")
    row.add(more, [0.0] * len(more))
    assert row.take(final=False).text.startswith("mil")  # it did not


def test_tokens_of_each_piece(tok) -> None:
    cache, decode = tok
    tokens = cache.encode("tiny-gpt2", "The river ran slowly past the old mill.")
    row = RowText(decode, ("old",))
    row.add(tokens, [float(i) for i in range(len(tokens))])
    piece = row.take(final=True)
    kept = list(piece.tokens)
    assert decode([tokens[k] for k in kept]).startswith(piece.text)
    assert all(row.starts[k] < len(piece.text) for k in kept)
