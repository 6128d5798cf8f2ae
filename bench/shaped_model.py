"""Write a randomly initialised model directory shaped like a real one (no hub access needed).

The weights are random; the config has the real model's shape (layers, widths, heads, vocab),
so memory and speed are realistic. The tokenizer is EZTinker's locally trained byte-level BPE
(2,048 tokens, EOS id 0), which fits inside every real vocabulary. Any EZTinker call can then
name the directory as its base model:

    uv run python bench/shaped_model.py --shape qwen2.5-0.5b --out /tmp/qwen2.5-0.5b-shaped
    uv run python examples/sl_loop.py --model /tmp/qwen2.5-0.5b-shaped
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from eztinker_tasks import catalog


def shapes() -> dict[str, Any]:
    common: dict[str, Any] = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}

    def rope(theta: float) -> dict[str, Any]:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}

    return {
        "qwen2.5-0.5b": Qwen2Config(
            hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
            max_position_embeddings=32768, rms_norm_eps=1e-6,
            tie_word_embeddings=True, **rope(1e6), **common,
        ),
        "llama-3.2-1b": LlamaConfig(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
            max_position_embeddings=131072, rms_norm_eps=1e-5,
            tie_word_embeddings=True, **rope(500000.0), **common,
        ),
        "llama-3.1-8b": LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
            max_position_embeddings=131072, rms_norm_eps=1e-5,
            tie_word_embeddings=False, **rope(500000.0), **common,
        ),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(shapes()), default="qwen2.5-0.5b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    t0 = time.perf_counter()
    with torch.device(args.device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(shapes()[args.shape], dtype=torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = catalog.ensure_tokenizer("tiny-llama", Path(tmp))
        for f in tokenizer.iterdir():
            if f.is_file():
                shutil.copy(f, args.out / f.name)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.shape}: {params / 1e9:.2f} B parameters in {args.out} "
          f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
