"""Schemas of the models resource (model list, tokenize, detokenize)."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from eztinker_web.fields import IntList


class ModelSchema(Schema):
    name = fields.String()
    architecture = fields.String()
    vocab_size = fields.Integer()
    max_context = fields.Integer()
    eos_token_id = fields.Integer(allow_none=True)
    builtin = fields.Boolean()
    description = fields.String()


class ModelListSchema(Schema):
    models = fields.List(fields.Nested(ModelSchema))
    default_model = fields.String()


class TokenizeSchema(Schema):
    base_model = fields.String(load_default=None, validate=validate.Length(min=1, max=256))
    text = fields.String(required=True)


class TokensSchema(Schema):
    tokens = fields.List(fields.Integer())
    base_model = fields.String()


class DetokenizeSchema(Schema):
    base_model = fields.String(load_default=None, validate=validate.Length(min=1, max=256))
    tokens = IntList(required=True)


class TextSchema(Schema):
    text = fields.String()
    base_model = fields.String()


class ModelQuerySchema(Schema):
    base_model = fields.String(
        required=True,
        validate=validate.Length(min=1, max=1024),
        metadata={"description": "A built-in model, a Hugging Face id or a local directory"},
    )
