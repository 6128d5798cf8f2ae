"""Write a randomly initialised model directory shaped like a real one (no hub access needed).

The weights are random; the config has the real model's shape (layers, widths, heads, vocab),
so memory and speed are realistic. (A worker can also build one directly, without a directory:
name the base model ``shaped:<shape>``.) The tokenizer is EZTinker's locally trained byte-level BPE
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
from transformers import AutoConfig, AutoModelForCausalLM

from eztinker_tasks import catalog
from eztinker_tasks.shapes import SHAPES


def shapes() -> dict[str, Any]:
    """The real shapes EZTinker knows (``eztinker_tasks.shapes``) as transformers configs."""
    out = {}
    for name, spec in SHAPES.items():
        spec = dict(spec)
        out[name] = AutoConfig.for_model(spec.pop("model_type"), **spec)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
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
