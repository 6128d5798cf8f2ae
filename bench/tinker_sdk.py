"""Per-op overhead of the official ``tinker`` SDK against EZTinker, next to our own SDK's.

Starts one stack (``eztinker server --no-flower``), makes a LoRA training client on
``tiny-gpt2`` with each SDK, and times the same small ``forward`` round trip (submit, then wait
for the result) with each, interleaved in rounds of 20 so a shared machine's slow phases hit
both alike. The issue's target: the official SDK within 1.5x of ours.

    uv run python bench/tinker_sdk.py [--samples 200] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from service import pct, start_server, wait_healthy

TOKENS = list(range(5, 22))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the worker)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="eztinker-bench-tinker-"))
    os.environ["TINKER_TELEMETRY"] = "0"
    server, base, log = start_server(tmp, args.device)
    try:
        wait_healthy(base, 120, str(log))
        import tinker
        from tinker import types as ttypes

        import eztinker
        from eztinker import types

        ours = eztinker.ServiceClient(base_url=base).create_lora_training_client(
            "tiny-gpt2", rank=8, seed=0
        )
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(TOKENS[:-1]),
            loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * 16},
        )
        official = tinker.ServiceClient(base_url=base, api_key="tml-bench")
        theirs = official.create_lora_training_client(
            base_model="tiny-gpt2", rank=8, seed=0
        ).result()
        tdatum = ttypes.Datum(
            model_input=ttypes.ModelInput.from_ints(TOKENS[:-1]),
            loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * 16},  # ty: ignore[invalid-argument-type]
        )

        def timed(fn: Callable[[], object]) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        def ours_op() -> None:
            ours.forward([datum]).result()

        def theirs_op() -> None:
            theirs.forward([tdatum], "cross_entropy").result()

        for _ in range(10):  # warm up both paths
            ours_op()
            theirs_op()
        a: list[float] = []
        b: list[float] = []
        for _ in range(0, args.samples, 20):
            a += [timed(ours_op) for _ in range(20)]
            b += [timed(theirs_op) for _ in range(20)]
        p50a, p50b = pct(a, 0.5) * 1e3, pct(b, 0.5) * 1e3
        print(f"forward round trip, {len(a)} each, p50 / p90 ms:")
        print(f"  eztinker SDK  {p50a:7.2f} / {pct(a, 0.9) * 1e3:7.2f}")
        print(f"  tinker 0.38   {p50b:7.2f} / {pct(b, 0.9) * 1e3:7.2f}")
        print(f"  ratio (p50)   {p50b / p50a:7.2f}x  (target <= 1.5x)")
        official.close("success")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
