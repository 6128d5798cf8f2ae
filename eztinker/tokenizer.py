"""A model's tokenizer, rebuilt locally from the files the server serves.

``load_tokenizer`` downloads ``tokenizer.json``, ``tokenizer_config.json`` and
``special_tokens_map.json`` from ``GET /v1/models/<name>/tokenizer/<file>`` (no Hugging Face
Hub access, so built-in models work offline). If ``transformers`` is importable it returns a
``PreTrainedTokenizerFast``; otherwise a small ``Tokenizer`` over the ``tokenizers`` package with
the parts of the Hugging Face interface a training loop uses.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _RustTokenizer

from eztinker.errors import NotFoundError
from eztinker.transport import Transport

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """The Hugging Face tokenizer interface a training loop uses: encode, decode, special ids."""

    def __init__(self, tokenizer: _RustTokenizer, config: dict[str, Any] | None = None) -> None:
        self._tok = tokenizer
        self.config = dict(config or {})
        self.name_or_path = str(self.config.get("name_or_path", ""))

    @classmethod
    def from_directory(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = directory / name
            if path.is_file():
                config.update(json.loads(path.read_text(encoding="utf-8")))
        return cls(_RustTokenizer.from_file(str(directory / "tokenizer.json")), config)

    # -- special tokens ----------------------------------------------------------------------
    def _special(self, key: str) -> str | None:
        return _token_text(self.config.get(key))

    def _special_id(self, key: str) -> int | None:
        text = self._special(key)
        return None if text is None else self._tok.token_to_id(text)

    @property
    def eos_token(self) -> str | None:
        return self._special("eos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def bos_token(self) -> str | None:
        return self._special("bos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def convert_ids_to_tokens(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={len(self)}, eos_token={self.eos_token!r})"


def download_tokenizer_files(transport: Transport, model: str, directory: Path) -> Path:
    """Write the model's tokenizer files into ``directory``; ``tokenizer.json`` is required."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        try:
            with transport.stream(
                "GET", f"/v1/tokenizer/{name}", params={"base_model": model}
            ) as response:
                (directory / name).write_bytes(response.read())
        except NotFoundError:
            if name == "tokenizer.json":
                raise
    return directory


def load_tokenizer(transport: Transport, model: str, prefer_transformers: bool = True) -> Any:
    """The tokenizer of ``model``: ``PreTrainedTokenizerFast`` if transformers is importable,
    else ``eztinker.tokenizer.Tokenizer``."""
    with tempfile.TemporaryDirectory(prefix="eztinker-tok-") as tmp:
        directory = download_tokenizer_files(transport, model, Path(tmp))
        if prefer_transformers and importlib.util.find_spec("transformers") is not None:
            try:
                from transformers import PreTrainedTokenizerFast

                return PreTrainedTokenizerFast.from_pretrained(str(directory))
            except Exception:  # a transformers that cannot read these files: use our own
                pass
        tok = Tokenizer.from_directory(directory)
        tok.name_or_path = model
        return tok
