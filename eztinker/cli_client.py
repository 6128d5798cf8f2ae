"""The client commands of ``eztinker``: talk to a running server over HTTP.

``create``, ``list``, ``show``, ``sample``, ``save``, ``load``, ``checkpoints``, ``download``,
``delete``, ``status``, ``models`` and ``wait``. Every command takes ``--json`` (machine-readable
output); commands that start an operation wait for it (``--no-wait`` prints the future id
instead). Errors print one line, ``error: <message>``, and exit with status 1.
Global options (before the command): ``--base-url`` and ``--api-key``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from eztinker.cli_progress import (
    cost_lines,
    download_with_progress,
    summary_lines,
    wait_for,
    wait_for_until,
)
from eztinker.errors import EZTinkerAPIError, EZTinkerError
from eztinker.futures import APIFuture
from eztinker.sampling_client import split_checkpoint_path
from eztinker.service_client import ServiceClient
from eztinker.transport import RetryPolicy

F = TypeVar("F", bound=Callable[..., Any])

# The CLI gives up on an unreachable server quickly (the SDK retries longer).
CLI_RETRY = RetryPolicy(max_retries=2, initial_delay=0.25, max_delay=2.0)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]
NoWaitOpt = Annotated[
    bool, typer.Option("--no-wait", help="Print the operation's future id instead of waiting.")
]


@dataclasses.dataclass
class CliState:
    base_url: str | None = None
    api_key: str | None = None


def _service(ctx: typer.Context) -> ServiceClient:
    state = ctx.find_object(CliState) or CliState()
    return ServiceClient(state.base_url, state.api_key, retry=CLI_RETRY)


def _stdout() -> Console:
    return Console(soft_wrap=False)


def _print_table(console: Console, table: Table) -> None:
    """Print at the table's natural width, even past the terminal's: ids are never cut."""
    need = Measurement.get(console, console.options.update(width=100_000), table).maximum
    console.width = max(console.width, need)
    console.print(table, crop=False)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(_plain(value), indent=2, default=_plain))


def _fail(
    message: str, as_json: bool, error: dict[str, Any] | None = None, hint: str | None = None
) -> typer.Exit:
    if as_json:
        _print_json({"error": error or {"message": message}})
    else:
        typer.echo(f"error: {' '.join(message.split())}", err=True)
        if hint:
            typer.echo(f"hint: {hint}", err=True)
    return typer.Exit(1)


# The server words its errors for every client; the CLI adds its own command where one helps.
# Keyed by error code; ``{run}`` is the command's run id.
_RUN_HINTS = {
    "run_state_lost": "eztinker load {run} [PATH] (default PATH: the run's last saved state)",
    "worker_gone": "eztinker load {run} [PATH] rebuilds the run on a live worker from a saved "
    "state (default PATH: its last one)",
}


def _hint(exc: EZTinkerAPIError, run: Any) -> str | None:
    template = _RUN_HINTS.get(exc.code)
    return template.format(run=run) if template and isinstance(run, str) else None


def _errors_as_one_line(fn: F) -> F:
    """Turn client errors into ``error: <message>`` and exit status 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except EZTinkerAPIError as exc:
            hint = _hint(exc, kwargs.get("run"))
            raise _fail(exc.message, as_json, exc.to_dict(), hint) from None
        except (EZTinkerError, ValueError, TimeoutError, OSError) as exc:
            raise _fail(str(exc) or type(exc).__name__, as_json) from None
        except KeyboardInterrupt:
            raise _fail("interrupted", as_json) from None

    return cast(F, wrapper)


def _wait(future: APIFuture[Any], what: str, as_json: bool) -> Any:
    """Wait for ``future`` with a progress bar on stderr (none in --json mode)."""
    return wait_for(future, what, as_json)


def _print_future(future: APIFuture[Any], as_json: bool) -> None:
    if as_json:
        _print_json({"future_id": future.future_id, "run_id": future.run_id})
    else:
        typer.echo(future.future_id)


def _fmt_loss(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def _fmt_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _id_column(table: Table, header: str) -> None:
    table.add_column(header, no_wrap=True, style="cyan")


def _submit_run_op(
    service: ServiceClient, run_id: str, op: str, body: dict[str, Any]
) -> APIFuture[Any]:
    sent = service.transport.request("POST", f"/v1/runs/{run_id}/{op}", json=body)
    return APIFuture(service.transport, sent["future_id"], op=op, run_id=run_id)


# -- commands ----------------------------------------------------------------------------------
def main_options(
    ctx: typer.Context,
    base_url: Annotated[
        str | None,
        typer.Option(
            "--base-url",
            envvar="EZTINKER_BASE_URL",
            help="Server URL for client commands (default: http://localhost:8000).",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="EZTINKER_API_KEY", help="API key (Bearer token)."),
    ] = None,
) -> None:
    """EZTinker: LoRA training ops on GPUs."""
    ctx.obj = CliState(base_url, api_key)


@_errors_as_one_line
def create(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Base model (default: server's).")
    ] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 32,
    seed: Annotated[int | None, typer.Option(help="Seed of the LoRA initialisation.")] = None,
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a LoRA training run."""
    service = _service(ctx)
    body: dict[str, Any] = {"rank": rank}
    if model:
        body["base_model"] = model
    if seed is not None:
        body["seed"] = seed
    created = service.transport.request("POST", "/v1/runs", json=body)
    run_id = created["run_id"]
    if no_wait:
        if as_json:
            _print_json(created)
        else:
            typer.echo(f"run {run_id} (creating; future {created['future_id']})")
        return
    future = APIFuture(service.transport, created["future_id"], op="create_run")
    _wait(future, f"creating run {run_id}", as_json)
    info = service.get_run(run_id)
    if as_json:
        _print_json(info)
        return
    typer.echo(f"created run {run_id}")
    typer.echo(f"  model {info.base_model}, LoRA rank {info.lora.rank}, worker {info.worker}")


@_errors_as_one_line
def list_runs(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List training runs."""
    runs = _service(ctx).list_runs()
    if as_json:
        _print_json({"runs": runs})
        return
    if not runs:
        typer.echo("no runs")
        return
    table = Table(box=None, header_style="bold")
    _id_column(table, "RUN")
    for header in ("MODEL", "STATUS", "STEP", "TOKENS", "LAST LOSS", "WORKER"):
        table.add_column(header, no_wrap=True)
    for r in runs:
        table.add_row(
            r.run_id, r.base_model, r.status, str(r.step), str(r.tokens_trained),
            _fmt_loss(r.last_loss), r.worker,
        )  # fmt: skip
    _print_table(_stdout(), table)


def _checkpoint_table(checkpoints: list[Any]) -> Table:
    table = Table(box=None, header_style="bold")
    _id_column(table, "PATH")
    for header in ("KIND", "STEP", "SIZE", "CREATED"):
        table.add_column(header, no_wrap=True)
    for c in checkpoints:
        table.add_row(c.path, c.kind, str(c.step), _fmt_size(c.size_bytes), _fmt_time(c.created_at))
    return table


@_errors_as_one_line
def show(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run id.")],
    as_json: JsonOpt = False,
) -> None:
    """Show one run: status, step, tokens trained, last loss and checkpoints."""
    info = _service(ctx).get_run(run)
    if as_json:
        _print_json(info)
        return
    out = _stdout()
    table = Table(box=None, show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(no_wrap=True)
    rows = [
        ("run", info.run_id),
        ("model", info.base_model),
        ("status", info.status),
        ("worker", info.worker),
        ("lora", f"rank {info.lora.rank}, alpha {info.lora.alpha or 32}"),
        ("step", str(info.step)),
        ("tokens trained", str(info.tokens_trained)),
        ("last loss", _fmt_loss(info.last_loss)),
        ("last state", info.last_state or "-"),
        ("created", _fmt_time(info.created_at)),
    ]
    if info.error:
        rows.append(("error", info.error))
    for key, value in rows:
        table.add_row(key, value)
    _print_table(out, table)
    if info.checkpoints:
        out.print()
        _print_table(out, _checkpoint_table(info.checkpoints))


@_errors_as_one_line
def sample(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="Prompt text.")],
    run: Annotated[str | None, typer.Option("--run", help="Sample a run's live weights.")] = None,
    checkpoint: Annotated[
        str | None, typer.Option("--checkpoint", help="Sample a checkpoint '<run_id>/<name>'.")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Sample a base model (default: server's).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Most new tokens.")] = 50,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="-1: off.")] = -1,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", help="Samples.")] = 1,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Sample continuations of PROMPT."""
    if sum(x is not None for x in (run, checkpoint, model)) > 1:
        raise ValueError("give at most one of --run, --checkpoint, --model")
    service = _service(ctx)
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "num_samples": num_samples,
    }
    if run:
        body["run_id"] = run
    elif checkpoint:
        body["checkpoint"] = checkpoint
    elif model:
        body["base_model"] = model
    if seed is not None:
        body["seed"] = seed
    sent = service.transport.request("POST", "/v1/sample", json=body, idempotent=True)
    future = APIFuture(service.transport, sent["future_id"], op="sample")
    if no_wait:
        _print_future(future, as_json)
        return
    result = _wait(future, "sampling", as_json)
    if as_json:
        _print_json(result)
        return
    sequences = result.get("sequences", [])
    eos = _eos_token_id(service, result.get("base_model"))
    for i, seq in enumerate(sequences):
        if len(sequences) > 1:
            typer.secho(f"--- sample {i + 1} ({seq.get('stop_reason')})", dim=True)
        text = seq.get("text") or ""
        tokens = seq.get("tokens") or []
        if eos is not None and tokens and tokens[-1] == eos:  # show the text without EOS
            text = service.detokenize(tokens[:-1], result.get("base_model"))
        typer.echo(prompt + text)


def _eos_token_id(service: ServiceClient, base_model: str | None) -> int | None:
    if not base_model:
        return None
    models = service.get_server_capabilities().supported_models
    return next((m.eos_token_id for m in models if m.name == base_model), None)


@_errors_as_one_line
def save(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run id.")],
    name: Annotated[str, typer.Argument(help="Checkpoint name.")],
    sampler: Annotated[
        bool, typer.Option("--sampler", help="Save sampler weights (not a resumable state).")
    ] = False,
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Save a checkpoint of RUN named NAME."""
    service = _service(ctx)
    kind = "sampler" if sampler else "state"
    future = _submit_run_op(service, run, "save", {"name": name, "kind": kind})
    if no_wait:
        _print_future(future, as_json)
        return
    info = _wait(future, f"saving {run}/{name}", as_json)
    if as_json:
        _print_json(info)
        return
    typer.echo(f"saved {info['path']} ({kind}, step {info.get('step', 0)})")


@_errors_as_one_line
def load(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run id.")],
    path: Annotated[
        str | None,
        typer.Argument(
            help="Checkpoint path '<run_id>/<name>' (default: the run's last saved state)."
        ),
    ] = None,
    no_optimizer: Annotated[
        bool, typer.Option("--no-optimizer", help="Load the weights only.")
    ] = False,
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Load a saved state into RUN; a lost run (its worker gone) moves to a live worker."""
    service = _service(ctx)
    if path is None:
        path = service.get_run(run).last_state
        if not path:
            raise ValueError(
                f"run {run} has no saved state of its own: name a checkpoint PATH "
                "(`eztinker checkpoints` lists them)"
            )
    future = _submit_run_op(service, run, "load", {"path": path, "optimizer": not no_optimizer})
    if no_wait:
        _print_future(future, as_json)
        return
    info = _wait(future, f"loading {path} into {run}", as_json)
    if as_json:
        _print_json(info)
        return
    worker = service.get_run(run).worker
    step = (info or {}).get("step", 0)
    typer.echo(f"loaded {path} into {run} (step {step}, worker {worker})")


@_errors_as_one_line
def checkpoints(
    ctx: typer.Context,
    run: Annotated[str | None, typer.Argument(help="Run id (default: all runs).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List checkpoints (of one run, or of all)."""
    found = _service(ctx).list_checkpoints(run)
    if as_json:
        _print_json({"checkpoints": found})
        return
    if not found:
        typer.echo("no checkpoints")
        return
    _print_table(_stdout(), _checkpoint_table(found))


@_errors_as_one_line
def download(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run id.")],
    name: Annotated[str, typer.Argument(help="Checkpoint name.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Directory to extract into.")] = ".",
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing directory.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Download checkpoint RUN/NAME and extract it to OUTPUT/NAME/."""
    service = _service(ctx)
    path = f"{run}/{name}"
    split_checkpoint_path(path)
    if (Path(output) / name).exists() and not force:
        raise ValueError(f"{Path(output) / name} already exists; add --force to replace it")
    if as_json:
        target = service.download_checkpoint(path, output, overwrite=force)
    else:
        target = download_with_progress(service, path, output, force)
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    if as_json:
        _print_json({"path": str(target), "files": files})
        return
    typer.echo(f"downloaded {path} to {target} ({len(files)} files)")


@_errors_as_one_line
def delete(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run id.")],
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete a run (after its queued operations; checkpoints stay on disk)."""
    future = _service(ctx).delete_run(run)
    if no_wait:
        _print_future(future, as_json)
        return
    result = _wait(future, f"deleting {run}", as_json)
    if as_json:
        _print_json(result)
        return
    typer.echo(f"deleted run {run}")


@_errors_as_one_line
def status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Show the service: broker, workers, the runs they hold and their queue depths."""
    service = _service(ctx)
    health = service.health()
    ok = health.get("status") == "ok"
    if as_json:
        _print_json(health)
        raise typer.Exit(0 if ok else 1)
    out = _stdout()
    broker = health.get("broker") or {}
    broker_text = (
        f"ok ({broker.get('latency_ms', 0):.1f} ms)" if broker.get("ok") else "[red]down[/red]"
    )
    out.print(f"server   {service.base_url}: [bold]{health.get('status')}[/bold]")
    out.print(f"broker   {broker_text}")
    out.print(f"runs     {health.get('runs', '-')}")
    if health.get("message"):
        out.print(f"message  {health['message']}", soft_wrap=True)
    workers = health.get("workers") or []
    if workers:
        table = Table(box=None, header_style="bold")
        _id_column(table, "WORKER")
        table.add_column("DEVICE", no_wrap=True)
        table.add_column("HEARTBEAT", no_wrap=True)
        _id_column(table, "QUEUE")
        table.add_column("DEPTH", no_wrap=True, justify="right")
        for w in workers:
            depths = w.get("queue_depths") or {}
            beat = f"{w.get('last_heartbeat_s', 0):.1f} s ago"
            rows = list(depths.items()) or [("-", "-")]
            for i, (queue, depth) in enumerate(rows):
                first = i == 0
                table.add_row(
                    w.get("name", "?") if first else "", w.get("device", "") if first else "",
                    beat if first else "", queue, str(depth),
                )  # fmt: skip
        out.print()
        _print_table(out, table)
    if not ok:
        raise typer.Exit(1)


@_errors_as_one_line
def models(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the models the server can train and sample."""
    caps = _service(ctx).get_server_capabilities()
    if as_json:
        _print_json(caps)
        return
    table = Table(box=None, header_style="bold")
    _id_column(table, "MODEL")
    for header in ("ARCH", "VOCAB", "CONTEXT", "DEFAULT"):
        table.add_column(header, no_wrap=True)
    table.add_column("DESCRIPTION", no_wrap=True)
    for m in caps.supported_models:
        default = "*" if m.name == caps.default_model else ""
        table.add_row(
            m.name, m.architecture, str(m.vocab_size), str(m.max_context), default, m.description
        )
    _print_table(_stdout(), table)


@_errors_as_one_line
def wait(
    ctx: typer.Context,
    future_id: Annotated[str, typer.Argument(help="A future id printed by --no-wait.")],
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Wait for an operation (a progress bar meanwhile) and summarise its result.

    ``--json`` prints the whole result instead (every logprob of a forward pass, ...).
    """
    future = _service(ctx).get_future(future_id)
    if as_json:
        _print_json(future.result(timeout))
        return
    result = wait_for_until(future, f"waiting for {future_id}", timeout)
    for line in summary_lines(future.op, result) + cost_lines(result, future.timing):
        typer.echo(line)
    typer.secho("(--json prints the whole result)", dim=True, err=True)


def register(app: typer.Typer) -> None:
    """Add the client commands and the global --base-url / --api-key options to ``app``."""
    app.callback()(main_options)
    app.command()(create)
    app.command("list")(list_runs)
    app.command()(show)
    app.command()(sample)
    app.command()(save)
    app.command()(load)
    app.command()(checkpoints)
    app.command()(download)
    app.command()(delete)
    app.command()(status)
    app.command()(models)
    app.command()(wait)
