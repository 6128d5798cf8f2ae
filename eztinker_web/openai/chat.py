"""Chat messages to a prompt with the model's own chat template (Jinja, rendered here).

The template is the one transformers' ``apply_chat_template`` uses: ``chat_template.jinja``
or ``tokenizer_config.json``'s ``chat_template`` in the model's tokenizer directory (written
by a worker when it first loads a hub model; the built-in models carry
``catalog.BUILTIN_CHAT_TEMPLATE``). It is rendered in a sandboxed Jinja environment, as
transformers does; the web never imports transformers or torch.
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from eztinker_tasks import catalog
from eztinker_tasks.errors import InvalidRequest, UnknownModel

_lock = threading.Lock()


def _raise(message: str) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=64)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise  # ty: ignore[invalid-assignment]
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent)
    return env.from_string(source)


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def template_of(model: str, data_dir: Path) -> tuple[str, dict[str, str]]:
    """The chat template of ``model`` and its special tokens (``bos_token``, ``eos_token``).

    Raises ``InvalidRequest`` (400) when the model has none (use ``/completions`` then), and
    ``UnknownModel`` while its tokenizer files are not here yet.
    """
    spec = catalog.get_builtin(catalog.tokenizer_model(model))
    directory = catalog.tokenizer_dir(model, data_dir)
    if spec is None and not catalog.has_tokenizer(directory):
        raise UnknownModel(
            f"no tokenizer files for {model!r} here yet (a worker writes them when it first "
            "loads the model)",
            errors={"model": ["tokenizer not available yet"]},
        )
    config: dict[str, Any] = {}
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except ValueError:
            config = {}
    source: Any = None
    jinja_path = directory / "chat_template.jinja"
    if jinja_path.is_file():
        source = jinja_path.read_text()
    source = source or config.get("chat_template")
    if isinstance(source, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not source and spec is not None:
        source = catalog.BUILTIN_CHAT_TEMPLATE
    if not isinstance(source, str) or not source:
        raise InvalidRequest(
            f"model {model!r} has no chat template: use /completions with a prompt instead",
            errors={"model": ["no chat template"]},
        )
    tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
    if spec is not None:
        tokens = {k: v or catalog.EOS_TOKEN for k, v in tokens.items()}
    return source, tokens


def render(model: str, data_dir: Path, messages: list[dict[str, str]]) -> str:
    """The prompt text of ``messages`` (each ``{"role", "content"}``), ending with the
    assistant's turn header (``add_generation_prompt``). InvalidRequest (400) if the template
    refuses them (it may call ``raise_exception``) or the model has no template."""
    source, tokens = template_of(model, data_dir)
    try:
        with _lock:
            template = _compile(source)
        return template.render(messages=messages, add_generation_prompt=True, **tokens)
    except TemplateError as exc:
        raise InvalidRequest(
            f"the chat template of {model!r} refused these messages: {exc}",
            errors={"messages": [str(exc)]},
        ) from None
