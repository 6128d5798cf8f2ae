"""Models: what can be trained, and tokenizing with their tokenizers (no GPU involved).

The model list shows the built-in models and, of the models workers have loaded, those that
base a run of the caller's tenant (every one for a caller who sees all).
"""

from __future__ import annotations

from typing import Any

from flask import send_file

from eztinker_tasks import catalog
from eztinker_tasks.errors import InvalidRequest, NotFound
from eztinker_web.blueprint import Blueprint
from eztinker_web.models.schemas import (
    DETOKENIZE_EXAMPLE,
    TOKENIZE_EXAMPLE,
    DetokenizeSchema,
    ModelListSchema,
    ModelQuerySchema,
    TextSchema,
    TokenizeSchema,
    TokensSchema,
)
from eztinker_web.services import services
from eztinker_web.tenancy import seen_model_names

blp = Blueprint("models", __name__, url_prefix="/v1", description="Models and tokenizers")


@blp.route("/models", methods=["GET"])
@blp.response(200, ModelListSchema)
def list_models():
    """Built-in models plus the models a worker has loaded for the caller's runs."""
    svc = services()
    models: dict[str, dict[str, Any]] = {}
    for spec in catalog.BUILTIN_MODELS.values():
        models[spec.name] = {
            "name": spec.name,
            "architecture": spec.architecture,
            "vocab_size": spec.vocab_size,
            "max_context": spec.max_context,
            "eos_token_id": spec.eos_token_id,
            "builtin": True,
            "description": spec.description,
        }
    seen = seen_model_names()
    for info in svc.store.list_models():
        if seen is None or info["name"] in seen:
            models.setdefault(info["name"], {**info, "description": ""})
    return {"models": list(models.values()), "default_model": svc.settings.default_model}


@blp.route("/tokenize", methods=["POST"])
@blp.arguments(TokenizeSchema(), example=TOKENIZE_EXAMPLE)
@blp.response(200, TokensSchema)
@blp.errors(404)
def tokenize(args: dict[str, Any]):
    """Text to token ids with the model's tokenizer."""
    svc = services()
    model = args["base_model"] or svc.settings.default_model
    return {"tokens": svc.tokenizers.encode(model, args["text"]), "base_model": model}


@blp.route("/detokenize", methods=["POST"])
@blp.arguments(DetokenizeSchema(), example=DETOKENIZE_EXAMPLE)
@blp.response(200, TextSchema)
@blp.errors(400, 404)
def detokenize(args: dict[str, Any]):
    """Token ids to text; with ``token_texts``, also each distinct token's own text (what a
    per-token view shows), so one request serves a whole sample."""
    svc = services()
    model = args["base_model"] or svc.settings.default_model
    vocab = svc.tokenizers.get(model).get_vocab_size(with_added_tokens=True)
    bad = [t for t in args["tokens"] if t < 0 or t >= vocab]
    if bad:
        raise InvalidRequest(
            f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
            errors={"tokens": [f"out of range: {bad[0]}"]},
        )
    text = svc.tokenizers.decode(model, args["tokens"])
    out: dict[str, Any] = {"text": text, "base_model": model}
    if args["token_texts"]:
        out["token_texts"] = {
            str(t): svc.tokenizers.decode(model, [t]) for t in dict.fromkeys(args["tokens"])
        }
    return out


@blp.route("/models/<path:name>/tokenizer/<filename>", methods=["GET"])
@blp.response(200, content_type="application/json")
@blp.errors(404)
def tokenizer_file(name: str, filename: str):
    """The model's tokenizer files, so clients can build the same tokenizer offline."""
    return _tokenizer_file(name, filename)


@blp.route("/tokenizer/<filename>", methods=["GET"])
@blp.arguments(ModelQuerySchema(), location="query")
@blp.response(200, content_type="application/json")
@blp.errors(404)
def tokenizer_file_of(args: dict[str, Any], filename: str):
    """The same, with the model named in the query (any name, local paths included)."""
    return _tokenizer_file(args["base_model"], filename)


def _tokenizer_file(name: str, filename: str):
    if filename not in catalog.TOKENIZER_FILES:
        raise NotFound(f"no tokenizer file {filename!r}; one of {list(catalog.TOKENIZER_FILES)}")
    svc = services()
    svc.tokenizers.get(name)  # builds a built-in tokenizer / 404s an unknown model
    directory = catalog.find_tokenizer_dir(
        name, svc.settings.data_dir, svc.settings.checkpoints_dir
    )
    path = directory / filename
    if not path.is_file():
        raise NotFound(f"model {name!r} has no {filename}")
    return send_file(path.resolve(), mimetype="application/json")
