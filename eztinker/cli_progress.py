"""Waiting in the CLI: a live progress bar while an operation runs, and short result summaries.

``wait_for`` shows, on stderr, a rich progress bar fed by ``APIFuture.result(on_progress=...)``:
the operation's place in its queue, then its phase (``prefill``/``decode``/``forward``/
``backward``), tokens generated of max_tokens while sampling, and the time elapsed. On a
terminal it redraws in place and disappears when the operation ends; elsewhere (a pipe, a log)
it prints nothing. ``--json`` shows no bar at all.

``download_with_progress`` shows the bytes of a checkpoint download the same way.

``summary_lines`` turns a result into a few lines (``eztinker wait`` prints them instead of a
forward pass's tens of thousands of logprobs); ``--json`` prints the whole result.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from eztinker.futures import APIFuture, FutureProgress
from eztinker.service_client import ServiceClient

MAX_SEQUENCES_SHOWN = 8
MAX_TEXT_CHARS = 160
MAX_LIST_SHOWN = 8


def progress_bar(console: Console) -> Progress:
    """The bar: spinner, what, phase, bar, counts, time elapsed (transient: gone when done)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("[cyan]{task.fields[phase]}"),
        BarColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def describe(progress: FutureProgress) -> tuple[str, str, int | None, int | None]:
    """(phase, counts, completed, total) for the bar; total None makes it pulse."""
    p = progress
    if p.phase == "queued":
        if p.ops_ahead is None:
            return "queued", "", None, None
        ahead = "op" if p.ops_ahead == 1 else "ops"
        return "queued", f"{p.ops_ahead} {ahead} ahead", None, None
    if p.phase == "decode" and p.tokens_total:
        done = p.tokens_done or 0
        counts = f"{done}/{p.tokens_total} tokens"
        if p.sequences and p.sequences > 1:
            counts += f" x {p.sequences} samples"
            if p.sequences_finished:
                counts += f" ({p.sequences_finished} stopped)"
        return "decode", counts, done, p.tokens_total
    if p.tokens_total is not None:
        what = "prompt tokens" if p.phase == "prefill" else "tokens"
        return p.phase, f"{p.tokens_total} {what}", None, None
    return p.phase, "", None, None


def wait_for(future: APIFuture[Any], what: str, as_json: bool) -> Any:
    """Wait for ``future``; a progress bar on stderr meanwhile (none with ``--json``)."""
    if as_json:
        return future.result()
    return wait_for_until(future, what, None)


def wait_for_until(future: APIFuture[Any], what: str, timeout: float | None) -> Any:
    """``future.result(timeout)`` with the progress bar on stderr (if it is a terminal)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        return future.result(timeout)
    with progress_bar(console) as bar:
        task: TaskID = bar.add_task(what, total=None, phase="", counts="")

        def show(progress: FutureProgress) -> None:
            phase, counts, completed, total = describe(progress)
            bar.update(task, phase=phase, counts=counts, total=total, completed=completed or 0)

        return future.result(timeout, on_progress=show)


def download_with_progress(service: ServiceClient, path: str, dest: str, force: bool) -> Path:
    """``download_checkpoint`` with a bar of bytes received, speed and time (on a terminal)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        return service.download_checkpoint(path, dest, overwrite=force)
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn())
    with Progress(TextColumn(f"downloading {path}"), *columns, console=console) as bar:
        task = bar.add_task("download", total=None)

        def show(received: int, total: int | None) -> None:
            bar.update(task, completed=received, total=total)

        return service.download_checkpoint(path, dest, overwrite=force, on_progress=show)


# -- summaries -------------------------------------------------------------------------------
def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _short(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _loss_lines(op: str, result: Mapping[str, Any]) -> list[str]:
    outputs = result.get("loss_fn_outputs") or []
    tokens = sum(len(o.get("logprobs") or []) for o in outputs if isinstance(o, Mapping))
    lines = [f"{op}: {len(outputs)} sequences, {tokens} tokens"]
    metrics = result.get("metrics") or {}
    lines += [f"  {key} = {_number(value)}" for key, value in metrics.items()]
    return lines  # the pass and the timing: cost_lines


def _sample_lines(result: Mapping[str, Any]) -> list[str]:
    sequences = result.get("sequences") or []
    prompt = result.get("prompt_tokens")
    head = f"sample: {len(sequences)} sequence{'s' if len(sequences) != 1 else ''}"
    if result.get("base_model"):
        head += f" of {result['base_model']}"
    if isinstance(prompt, list):
        head += f", prompt of {len(prompt)} tokens"
    lines = [head]
    for i, seq in enumerate(sequences[:MAX_SEQUENCES_SHOWN]):
        n = len(seq.get("tokens") or [])
        text = _short(str(seq.get("text") or ""))
        lines.append(f"  [{i}] {n} tokens, {seq.get('stop_reason')}: {text!r}")
    if len(sequences) > MAX_SEQUENCES_SHOWN:
        lines.append(f"  ... and {len(sequences) - MAX_SEQUENCES_SHOWN} more")
    return lines


def _value_lines(key: str, value: Any, indent: str, depth: int) -> list[str]:
    if isinstance(value, Mapping):
        if depth >= 2 or len(value) > 2 * MAX_LIST_SHOWN:
            return [f"{indent}{key}: {{{len(value)} keys}}"]
        lines = [f"{indent}{key}:"]
        for k, v in value.items():
            lines += _value_lines(str(k), v, indent + "  ", depth + 1)
        return lines
    if isinstance(value, list):
        scalars = all(not isinstance(v, Mapping | list) for v in value)
        if scalars and len(value) <= MAX_LIST_SHOWN:
            return [f"{indent}{key}: [{', '.join(_number(v) for v in value)}]"]
        return [f"{indent}{key}: [{len(value)} items]"]
    if isinstance(value, str):
        return [f"{indent}{key}: {_short(value)}"]
    return [f"{indent}{key}: {_number(value)}"]


def cost_lines(result: Any, timing: Mapping[str, Any] | None) -> list[str]:
    """What an operation cost: time queued and running, and the engine pass it shared."""
    lines = []
    if timing:
        queued, ran = _number(timing.get("queued_ms")), _number(timing.get("run_ms"))
        line = f"  queued {queued} ms, ran {ran} ms"
        if timing.get("in_pass_of"):
            line += f" (in the pass of {timing['in_pass_of']})"
        lines.append(line)
    batch = result.get("batch") if isinstance(result, Mapping) else None
    if isinstance(batch, Mapping):
        lines.append(
            f"  pass: {batch.get('runs')} run(s), {batch.get('calls')} call(s), "
            f"{batch.get('tokens')} tokens"
            + (", activation checkpointing" if batch.get("activation_checkpointing") else "")
        )
    return lines


def summary_lines(op: str | None, result: Any) -> list[str]:
    """A few lines that say what ``result`` (of operation ``op``) holds."""
    if isinstance(result, Mapping):
        if op in ("forward_backward", "forward") or "loss_fn_outputs" in result:
            return _loss_lines(op or "forward", result)
        if op == "sample" or "sequences" in result:
            return _sample_lines(result)
        lines = [f"{op}:"] if op else []
        for key, value in result.items():
            lines += _value_lines(str(key), value, "  " if op else "", 0)
        return lines
    if isinstance(result, list):
        return [f"{op or 'result'}: [{len(result)} items]"]
    return [f"{op or 'result'}: {_short(str(result))}"]
