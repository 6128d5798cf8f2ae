"""What a metrics point adds to the transaction that stores an op's result: the same MULTI with
the result writes, with and without the point's script (embedded Valkey, one client, round
trips included), alternated in rounds of 200 transactions.

    uv run python bench/metrics_point.py
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import redis

from eztinker_tasks import names
from eztinker_tasks.broker import EmbeddedBroker
from eztinker_tasks.metrics_history import metrics_key, record_point

RESULT = {"metrics": {"loss:sum": 1.0}, "loss_fn_outputs": [{"logprobs": [0.1] * 32}]}
VALUE = json.dumps({"status": "SUCCESS", "result": RESULT})
POINT = {"metrics": {"loss:sum": 1.0, "num_tokens:sum": 7.0}}


def main() -> None:
    broker = EmbeddedBroker(Path(tempfile.mkdtemp()))
    r = redis.Redis.from_url(broker.start().url)
    seq = 0

    def transaction(point: bool) -> None:
        nonlocal seq
        seq += 1
        with r.pipeline(transaction=True) as pipe:  # what a worker writes with a result
            pipe.set(f"meta:{seq}", VALUE, ex=60)
            pipe.publish(f"meta:{seq}", VALUE)
            pipe.hset("applied", str(seq), "future")
            pipe.hset("stats", mapping={"step": "1", "last_loss": "1.0"})
            if point:
                record_point(pipe, "run_bench", names.FORWARD_BACKWARD, seq, POINT, 1)
            pipe.execute()

    timings: dict[bool, list[float]] = {False: [], True: []}
    try:
        for _ in range(20):
            for point in (False, True):
                started = time.perf_counter()
                for _ in range(200):
                    transaction(point)
                timings[point].append((time.perf_counter() - started) / 200 * 1e6)
        for point, values in timings.items():
            label = "with the point" if point else "without      "
            print(f"{label}: median {statistics.median(values):.1f} us per transaction")
        print(f"points stored: {r.zcard(metrics_key('run_bench'))} (one per seq_id)")
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
