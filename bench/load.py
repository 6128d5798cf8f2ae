"""Load: many SDK clients running mixed operations at once, every counter checked exactly.

Starts the real stack (``eztinker server --no-flower``: embedded broker, gunicorn, one CPU
worker) in a temporary data dir, or uses ``--base-url``. Then ``--clients`` threads, each with
its own ``eztinker.ServiceClient`` and its own LoRA run on tiny-gpt2, each run ``--ops``
operations one after another: ``forward_backward`` (1-2 datums of 8-32 tokens),
``optim_step``, ``sample`` (8 greedy tokens of the run's live weights) and ``save_state``, in
a mix drawn from a seeded RNG (the same plan every time). The clock starts once every run is
ready; an op's latency is the time from the SDK call to its result.

Then every run is checked against what its client sent: no op failed; its ``step`` and each
``optim_step`` result's step are the optim_steps sent (1, 2, 3, ... in order); its
``tokens_trained`` is the input tokens of its forward_backward datums; ``last_seq_id`` is
its training ops sent (no op lost, none applied twice); its checkpoints are exactly the saved
names, each at the step it was saved at. Then each client deletes its checkpoints and its run
(a started server's data dir goes too). It prints p50/p99 latency per op in a table.

    uv run python bench/load.py [--clients 32] [--ops 200] [--seed 0] [--base-url URL]

``tests/integration/test_load.py`` runs the same (32 clients x 20 ops) against the test stack.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eztinker import SamplingClient, ServiceClient, TrainingClient, types

MODEL = "tiny-gpt2"
VOCAB = 2048  # tiny-gpt2's
# Relative weights of the mixed operations.
MIX = {"forward_backward": 4, "optim_step": 3, "sample": 2, "save": 1}
OPS = tuple(MIX)
TRAINING_OPS = ("forward_backward", "optim_step", "save")  # numbered by seq_id; sample is not
GREEDY = types.SamplingParams(max_tokens=8, temperature=0.0)


def plan(seed: int, client: int, ops: int) -> list[str]:
    """The operations client ``client`` runs, in order (the same for the same seed)."""
    rng = random.Random(f"{seed}:{client}")
    return rng.choices(OPS, weights=list(MIX.values()), k=ops)


def batch(rng: random.Random) -> list[types.Datum]:
    """1-2 datums of 8-32 input tokens, each position predicting the next token."""
    out = []
    for _ in range(rng.randint(1, 2)):
        tokens = [rng.randrange(1, VOCAB) for _ in range(rng.randint(9, 33))]
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
            )
        )
    return out


@dataclass
class ClientReport:
    """What one client sent, how long each op took, and what went wrong."""

    run_id: str = ""
    latencies: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})
    sent: Counter[str] = field(default_factory=Counter)
    tokens_sent: int = 0
    saves: dict[str, int] = field(default_factory=dict)  # checkpoint name -> step when saved
    problems: list[str] = field(default_factory=list)


def run_client(
    base_url: str, seed: int, client: int, ops: int, start: threading.Barrier
) -> ClientReport:
    """Create a run, wait for every client to be ready, then run this client's plan."""
    report = ClientReport()
    rng = random.Random(f"{seed}:{client}:data")
    with ServiceClient(base_url) as service:
        training = service.create_lora_training_client(MODEL, rank=8, seed=client)
        report.run_id = training.run_id
        sampler = training.create_sampling_client()  # queued behind the run's earlier ops
        start.wait()
        for i, op in enumerate(plan(seed, client, ops)):
            t0 = time.perf_counter()
            try:
                ok = run_op(training, sampler, report, op, i, rng)
            except Exception as exc:  # counted; the client goes on
                ok, why = False, repr(exc)
            else:
                why = "unexpected result"
            report.latencies[op].append(time.perf_counter() - t0)
            report.sent[op] += 1
            if not ok:
                report.problems.append(f"{training.run_id} op {i} {op}: {why}")
        report.problems += check_run(service, report)
        for name in report.saves:  # checked: they would only fill the disk
            service.delete_checkpoint(f"{training.run_id}/{name}")
        service.delete_run(training.run_id).result()
    return report


def run_op(
    training: TrainingClient,
    sampler: SamplingClient,
    report: ClientReport,
    op: str,
    i: int,
    rng: random.Random,
) -> bool:
    """Run one operation through the SDK, wait for its result; whether it is the one expected."""
    steps = report.sent["optim_step"]  # optim_steps before this op
    if op == "forward_backward":
        data = batch(rng)
        out = training.forward_backward(data).result()
        report.tokens_sent += sum(len(d.model_input.to_ints()) for d in data)
        return len(out.loss_fn_outputs) == len(data) and out.metrics["loss:sum"] > 0
    if op == "optim_step":
        step = training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        return (step.metrics or {}).get("step") == steps + 1
    if op == "sample":
        prompt = types.ModelInput.from_ints([rng.randrange(1, VOCAB) for _ in range(8)])
        got = sampler.sample(prompt, 1, GREEDY).result()
        return len(got.sequences) == 1 and 1 <= len(got.sequences[0].tokens) <= 8
    report.saves[f"load-{i}"] = steps
    saved = training.save_state(f"load-{i}").result()
    return saved.checkpoint is not None and saved.checkpoint.step == steps


def check_run(service: ServiceClient, report: ClientReport) -> list[str]:
    """The run's counters against what was sent: any difference is a lost or repeated op."""
    run = service.transport.request("GET", f"/v1/runs/{report.run_id}")
    want = {
        "status": "ready",
        "step": report.sent["optim_step"],
        "tokens_trained": report.tokens_sent,
        "last_seq_id": sum(report.sent[op] for op in TRAINING_OPS),
        "checkpoints": report.saves,
    }
    got = {k: run[k] for k in want if k != "checkpoints"}
    got["checkpoints"] = {c["name"]: c["step"] for c in run["checkpoints"]}
    return [
        f"{report.run_id} {key}: {got[key]!r}, expected {value!r}"
        for key, value in want.items()
        if got[key] != value
    ]


@dataclass
class LoadResult:
    clients: int
    ops: int
    wall_s: float
    reports: list[ClientReport]

    @property
    def problems(self) -> list[str]:
        return [p for r in self.reports for p in r.problems]

    def latencies(self, op: str | None = None) -> list[float]:
        ops = [op] if op else list(OPS)
        return sorted(t for r in self.reports for o in ops for t in r.latencies[o])


def run_load(base_url: str, clients: int, ops: int, seed: int = 0) -> LoadResult:
    """``clients`` threads, one run each, ``ops`` operations each; every run checked."""
    reports: list[ClientReport | None] = [None] * clients
    start = threading.Barrier(clients + 1)
    crashed: list[str] = []

    def client(i: int) -> None:
        try:
            reports[i] = run_client(base_url, seed, i, ops, start)
        except Exception as exc:  # failed outside its ops: creating, checking or deleting its run
            crashed.append(f"client {i}: {exc!r}")
            start.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a client failed to start
        start.wait()  # every run created: the clock starts
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = [r for r in reports if r is not None]
    if crashed:
        done.append(ClientReport(problems=crashed))
    return LoadResult(clients, ops, wall, done)


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def table(result: LoadResult) -> str:
    total = result.clients * result.ops
    lines = [
        f"{result.clients} SDK clients x {result.ops} mixed ops ({MODEL}, one run each): "
        f"{total} ops in {result.wall_s:.1f} s, {total / result.wall_s:.1f} ops/s",
        f"{'op':<18}{'count':>8}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}",
    ]
    for op in (*OPS, None):
        times = result.latencies(op)
        ms = [pct(times, 0.5) * 1e3, pct(times, 0.99) * 1e3, (times[-1] if times else 0) * 1e3]
        lines.append(f"{op or 'all':<18}{len(times):>8}" + "".join(f"{v:>10.1f}" for v in ms))
    problems = result.problems
    lines.append(f"errors, lost or repeated ops: {len(problems)}")
    lines += [f"  {p}" for p in problems[:20]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--ops", type=int, default=200, help="operations per client")
    parser.add_argument("--seed", type=int, default=0, help="seed of the op mix and the data")
    parser.add_argument("--base-url", help="a running server (default: start one here)")
    parser.add_argument("--device", default="cpu", help="the started server's worker device")
    args = parser.parse_args()

    if args.base_url:
        result = run_load(args.base_url, args.clients, args.ops, args.seed)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from service import start_server, wait_healthy  # bench/service.py

        tmp = Path(tempfile.mkdtemp(prefix="eztinker-load-"))
        server, base, log = start_server(tmp, args.device)
        try:
            wait_healthy(base, 180, str(log))
            result = run_load(base, args.clients, args.ops, args.seed)
        finally:
            server.send_signal(signal.SIGINT)  # as Ctrl-C: the whole stack stops
            server.wait(60)
            shutil.rmtree(tmp, ignore_errors=True)
    print(table(result))
    if result.problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
