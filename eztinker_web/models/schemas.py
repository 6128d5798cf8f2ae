"""Schemas of the models resource (model list, tokenize, detokenize)."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from eztinker_web.fields import IntList, JsonBoolean


class ModelSchema(Schema):
    name = fields.String(required=True)
    architecture = fields.String(required=True)
    vocab_size = fields.Integer(required=True)
    max_context = fields.Integer(required=True)
    eos_token_id = fields.Integer(required=True, allow_none=True)
    builtin = fields.Boolean(required=True)
    description = fields.String(required=True)


class ModelListSchema(Schema):
    models = fields.List(fields.Nested(ModelSchema), required=True)
    default_model = fields.String(required=True)


TOKENIZE_EXAMPLE = {"text": "The river ran slowly past the old mill.", "base_model": "tiny-gpt2"}


class TokenizeSchema(Schema):
    base_model = fields.String(load_default=None, validate=validate.Length(min=1, max=256))
    text = fields.String(required=True)


class TokensSchema(Schema):
    tokens = fields.List(fields.Integer(), required=True)
    base_model = fields.String(required=True)


DETOKENIZE_EXAMPLE = {"tokens": [281, 559, 311, 286, 1093], "base_model": "tiny-gpt2"}


class DetokenizeSchema(Schema):
    base_model = fields.String(load_default=None, validate=validate.Length(min=1, max=256))
    tokens = IntList(required=True)
    token_texts = JsonBoolean(
        load_default=False,
        metadata={"description": "Also return each distinct token's own text (token_texts)"},
    )


class TextSchema(Schema):
    text = fields.String(required=True)
    base_model = fields.String(required=True)
    token_texts = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        metadata={"description": "Each distinct token id (as a string) to its own text"},
    )


class ModelQuerySchema(Schema):
    base_model = fields.String(
        required=True,
        validate=validate.Length(min=1, max=1024),
        metadata={"description": "A built-in model, a Hugging Face id or a local directory"},
    )
