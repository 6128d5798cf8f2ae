"""Write a random-weight model of a real shape as a local model directory (safetensors, sharded
at 5 GB, with the built-in tokenizer), to benchmark loading a base from disk as a hub checkpoint
would be loaded:

    python bench/save_shaped.py shaped:llama-3.1-8b /tmp/llama-8b-random
    python bench/multigpu_service.py --gpus 2 --base /tmp/llama-8b-random
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from eztinker_tasks import catalog, shapes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", help="a shaped: name, e.g. shaped:llama-3.1-8b")
    parser.add_argument("out", type=Path, help="the directory to write")
    args = parser.parse_args()
    spec = shapes.check(args.shape)
    if spec is None:
        parser.error(f"not a shaped: name: {args.shape}")
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.monotonic()
    with torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.out, max_shard_size="5GB")
    with tempfile.TemporaryDirectory() as data_dir:
        tokenizer = catalog.ensure_tokenizer(shapes.TOKENIZER, Path(data_dir))
        for file in Path(tokenizer).iterdir():
            shutil.copy(file, args.out / file.name)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 2**30
    print(f"{args.shape} -> {args.out}: {size:.1f} GiB in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
