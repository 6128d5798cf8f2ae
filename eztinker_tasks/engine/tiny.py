"""Builds the built-in tiny models (``tiny-gpt2``, ``tiny-llama``) into the on-disk model cache.

A tiny model is a transformers config from ``catalog.BUILTIN_MODELS``, fixed-seed random
weights and the locally trained byte-level BPE tokenizer, saved once to
``data_dir/models/<name>/`` (temp dir + rename, under a file lock). The engine then loads it
with ``from_pretrained`` on that directory, exactly like a hub model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from eztinker_tasks import catalog
from eztinker_tasks.catalog import BuiltinModel


def tiny_config(spec: BuiltinModel) -> PretrainedConfig:
    """The transformers config of a built-in model (no dropout, EOS = BOS = ``eos_token_id``)."""
    if spec.architecture == "gpt2":
        return GPT2Config(
            vocab_size=spec.vocab_size,
            n_positions=spec.max_context,
            n_embd=spec.hidden_size,
            n_layer=spec.num_layers,
            n_head=spec.num_heads,
            n_inner=spec.intermediate_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=spec.eos_token_id,
            eos_token_id=spec.eos_token_id,
            tie_word_embeddings=True,
        )
    if spec.architecture == "llama":
        return LlamaConfig(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            max_position_embeddings=spec.max_context,
            bos_token_id=spec.eos_token_id,
            eos_token_id=spec.eos_token_id,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown tiny architecture {spec.architecture!r}")


def is_built(directory: Path) -> bool:
    return (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()


def ensure_tiny_model(spec: BuiltinModel, data_dir: Path) -> Path:
    """The directory of built-in model ``spec``, building it on first use."""
    directory = catalog.model_dir(spec.name, data_dir)
    if is_built(directory):
        return directory
    tokenizer = catalog.ensure_tokenizer(spec.name, data_dir)
    with catalog.file_lock(directory.parent / f".{directory.name}.lock"):
        if is_built(directory):
            return directory
        with catalog.atomic_directory(directory) as tmp:
            config = tiny_config(spec)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.save_pretrained(tmp)
            for name in catalog.TOKENIZER_FILES:
                shutil.copyfile(tokenizer / name, tmp / name)
    return directory
