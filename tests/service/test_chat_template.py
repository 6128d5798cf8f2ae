"""The built-in models' chat template: transformers' ``apply_chat_template`` and the web's own
torch-free rendering (``eztinker_web.openai.chat``) give the same prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from eztinker_tasks import catalog
from eztinker_tasks.errors import InvalidRequest, UnknownModel
from eztinker_web.openai.chat import render

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where does the river go?"},
    {"role": "assistant", "content": "To the sea."},
    {"role": "user", "content": "Why?"},
]


@pytest.mark.parametrize("name", sorted(catalog.BUILTIN_MODELS))
def test_web_rendering_equals_transformers(model_cache: Path, name: str) -> None:
    data_dir = model_cache  # the tiny models, built once per session
    tokenizer = AutoTokenizer.from_pretrained(catalog.model_dir(name, data_dir))
    assert tokenizer is not None
    want = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    got = render(name, data_dir, MESSAGES)
    assert got == want
    assert got.endswith("<|user|>\nWhy?<|endoftext|>\n<|assistant|>\n")
    # the turn separator is the model's EOS: one token, so generation stops at a turn's end
    ids = tokenizer.encode("<|endoftext|>", add_special_tokens=False)
    assert ids == [catalog.BUILTIN_MODELS[name].eos_token_id]


def test_a_model_without_a_template_is_refused(tmp_path: Path) -> None:
    directory = catalog.tokenizer_dir("someone/model", tmp_path)
    directory.mkdir(parents=True)
    (directory / "tokenizer_config.json").write_text("{}")
    with pytest.raises(InvalidRequest, match="no chat template"):
        render("someone/model", tmp_path, MESSAGES)


def test_no_tokenizer_files_yet(tmp_path: Path) -> None:
    with pytest.raises(UnknownModel, match="here yet"):
        render("someone/unloaded", tmp_path, MESSAGES)


def test_a_template_that_raises_is_a_400(tmp_path: Path) -> None:
    directory = catalog.tokenizer_dir("someone/strict", tmp_path)
    directory.mkdir(parents=True)
    (directory / "tokenizer_config.json").write_text("{}")
    (directory / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    )
    with pytest.raises(InvalidRequest, match="user first"):
        render("someone/strict", tmp_path, MESSAGES)
