"""Torch-free tokenizers for the web process and the tasks layer.

Built-in models build their tokenizer locally (``catalog.ensure_tokenizer``); for hub and local
models the worker writes the tokenizer files into ``catalog.tokenizer_dir`` when it first loads the
model, and a copy into the shared checkpoints dir (``catalog.shared_tokenizer_dir``), so the web
process, on this host or another, can tokenize without importing torch or transformers.
"""

from __future__ import annotations

import threading
from pathlib import Path

from tokenizers import Tokenizer

from eztinker_tasks import catalog
from eztinker_tasks.errors import UnknownModel


class TokenizerCache:
    """Loads each model's ``tokenizer.json`` once per process."""

    def __init__(self, data_dir: Path, checkpoints_dir: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.checkpoints_dir = None if checkpoints_dir is None else Path(checkpoints_dir)
        self._cache: dict[str, Tokenizer] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> Tokenizer:
        model = catalog.tokenizer_model(model)  # a shaped: model uses a built-in tokenizer
        with self._lock:
            tok = self._cache.get(model)
            if tok is not None:
                return tok
            if model in catalog.BUILTIN_MODELS:
                directory = catalog.ensure_tokenizer(model, self.data_dir)
            else:
                directory = catalog.find_tokenizer_dir(model, self.data_dir, self.checkpoints_dir)
            path = Path(directory) / "tokenizer.json"
            if not path.exists() and not (catalog.is_hub_id(model) or Path(model).is_dir()):
                known = ", ".join(sorted(catalog.BUILTIN_MODELS))
                raise UnknownModel(
                    f"unknown model {model!r}: not a built-in model ({known}), a local model "
                    "directory or a Hugging Face model id",
                    errors={"base_model": ["unknown model"]},
                )
            if not path.exists():
                raise UnknownModel(
                    f"no tokenizer for model {model!r} here yet: it is not built in, and a "
                    "worker writes a model's tokenizer (if it has one) when it first loads the "
                    "model, for a run on it or a sample from it; until then use token ids",
                    errors={"base_model": [f"tokenizer not available yet: {model}"]},
                )
            tok = Tokenizer.from_file(str(path))
            self._cache[model] = tok
            return tok

    def encode(self, model: str, text: str) -> list[int]:
        return list(self.get(model).encode(text, add_special_tokens=False).ids)

    def decode(self, model: str, tokens: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``tokens``; special tokens such as EOS are left out unless asked for."""
        return self.get(model).decode(tokens, skip_special_tokens=skip_special_tokens)
