"""Random-weight bases of real shapes, by name: ``shaped:<shape>`` (benchmarks without the hub).

``shaped:llama-3.1-8b`` is a model with Llama-3.1-8B's exact shape (layers, widths, heads,
vocabulary) and random weights (seed 0), built directly on the worker's device: no download, no
140 GB file. Its tokenizer is the built-in byte-level BPE (2,048 tokens, inside every real
vocabulary). Speed and memory are those of the real model; what it writes is noise. Torch-free
(the web validates names with it); the engine builds the model from ``SHAPES[shape]``.
"""

from __future__ import annotations

from typing import Any

PREFIX = "shaped:"
TOKENIZER = "tiny-llama"  # the built-in model whose tokenizer shaped models use

_COMMON: dict[str, Any] = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def _rope(theta: float) -> dict[str, Any]:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}


# model_type + the config's keyword arguments (transformers' AutoConfig.for_model)
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, **_rope(1e6), **_COMMON,
    },
    "llama-3.2-1b": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True, **_rope(500000.0), **_COMMON,
    },
    "llama-3.1-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, **_rope(500000.0), **_COMMON,
    },
    "llama-3.1-70b": {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, **_rope(500000.0), **_COMMON,
    },
}  # fmt: skip


def shape_of(name: str) -> str | None:
    """The shape a ``shaped:<shape>`` model name asks for; None for any other name."""
    if not name.startswith(PREFIX):
        return None
    return name[len(PREFIX) :]


def check(name: str) -> dict[str, Any] | None:
    """The config of a shaped model name, None if ``name`` is not one; ValueError if unknown."""
    shape = shape_of(name)
    if shape is None:
        return None
    if shape not in SHAPES:
        known = ", ".join(PREFIX + s for s in sorted(SHAPES))
        raise ValueError(f"unknown shaped model {name!r}; known: {known}")
    return dict(SHAPES[shape])


BYTES_PER_PARAM = 2  # bf16, how GPU workers hold a base


def param_bytes(name: str) -> int | None:
    """The bytes of a shaped base's weights in bf16 (None: not a known ``shaped:`` name).

    Embedding, per layer attention (GQA) + gated MLP + 2 norms, final norm, and an untied
    unembedding.
    """
    try:
        spec = check(name)
    except ValueError:
        return None
    if spec is None:
        return None
    d, ff, vocab = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    heads, kv = spec["num_attention_heads"], spec["num_key_value_heads"]
    kv_width = d // heads * kv
    layer = 2 * d * d + 2 * d * kv_width + 3 * d * ff + 2 * d
    params = vocab * d + spec["num_hidden_layers"] * layer + d
    if not spec.get("tie_word_embeddings", False):
        params += vocab * d
    return params * BYTES_PER_PARAM
