"""Time to first token and tokens/s through ``/openai/v1`` against ``/v1/sample``.

Starts one stack (``eztinker server --no-flower``) and sends the same request (``tiny-gpt2``
by default, ``--tokens`` new tokens at temperature 1 with a fixed seed, so every mode samples
the same tokens) three ways, interleaved round by round so a shared machine's slow phases hit
all alike:

- ``/v1/sample``: submit, then long-poll the future (``?wait=``): the first token arrives with
  the last;
- ``openai``: ``client.completions.create`` (the route waits on the same future);
- ``openai stream``: ``stream=True``: time to the first chunk with text, and to the last.

Prints a side-by-side table (p50 over ``--rounds``) with ratios to ``/v1/sample``.

    uv run python bench/openai_api.py [--rounds 10] [--tokens 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
from service import pct, start_server, wait_healthy

PROMPT = "Once upon a time"
SEED = 7


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the worker)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="eztinker-bench-openai-"))
    server, base, log = start_server(tmp, args.device)
    try:
        wait_healthy(base, 180, str(log))
        http = httpx.Client(base_url=base, timeout=120)
        client = openai.OpenAI(base_url=base + "/openai/v1", api_key="bench", max_retries=0)
        ask: dict[str, Any] = {"max_tokens": args.tokens, "temperature": 1.0, "seed": SEED}

        def v1() -> tuple[float, float, int]:
            t0 = time.perf_counter()
            body = {"base_model": args.model, "prompt": PROMPT, **ask}
            future = http.post("/v1/sample", json=body).json()["future_id"]
            while True:
                got = http.get(f"/v1/futures/{future}", params={"wait": 30}).json()
                if got["status"] in ("succeeded", "failed"):
                    break
            total = time.perf_counter() - t0
            assert got["status"] == "succeeded", got
            return total, total, len(got["result"]["sequences"][0]["tokens"])

        def plain() -> tuple[float, float, int]:
            t0 = time.perf_counter()
            out = client.completions.create(model=args.model, prompt=PROMPT, **ask)
            total = time.perf_counter() - t0
            assert out.usage is not None
            return total, total, out.usage.completion_tokens

        def streamed() -> tuple[float, float, int]:
            t0 = time.perf_counter()
            first, tokens = None, 0
            stream = client.completions.create(
                model=args.model, prompt=PROMPT, stream=True,
                stream_options={"include_usage": True}, **ask,
            )  # fmt: skip
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - t0
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            total = time.perf_counter() - t0
            return first or total, total, tokens

        modes: dict[str, Callable[[], tuple[float, float, int]]] = {
            "/v1/sample": v1,
            "openai": plain,
            "openai stream": streamed,
        }
        for fn in modes.values():  # warm up every path (model load, tokenizers, connections)
            fn()
        runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in modes}
        for _ in range(args.rounds):
            for name, fn in modes.items():
                runs[name].append(fn())

        def stats(name: str) -> tuple[float, float, float]:
            ttft = pct([r[0] for r in runs[name]], 0.5)
            total = pct([r[1] for r in runs[name]], 0.5)
            tokens = sum(r[2] for r in runs[name]) / len(runs[name])
            return ttft, total, tokens / total

        ref_ttft, ref_total, ref_rate = stats("/v1/sample")
        tokens = runs["/v1/sample"][0][2]
        print(f"{args.model}, {tokens} new tokens per request, p50 of {args.rounds} rounds "
              f"(device {args.device})")  # fmt: skip
        print(f"{'route':<15}{'TTFT ms':>10}{'x':>7}{'total ms':>11}{'x':>7}{'tok/s':>9}{'x':>7}")
        for name in modes:
            ttft, total, rate = stats(name)
            print(
                f"{name:<15}{ttft * 1e3:>10.1f}{ttft / ref_ttft:>7.2f}{total * 1e3:>11.1f}"
                f"{total / ref_total:>7.2f}{rate:>9.1f}{rate / ref_rate:>7.2f}"
            )
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
