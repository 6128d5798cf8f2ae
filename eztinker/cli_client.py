"""The client commands of ``eztinker``: talk to a running server over HTTP.

``create``, ``list``, ``show``, ``sample``, ``save``, ``load``, ``checkpoints``, ``download``,
``delete``, ``status``, ``models`` and ``wait``. Every command takes ``--json`` (machine-readable
output); commands that start an operation wait for it (``--no-wait`` prints the future id
instead). Errors print one line, ``error: <message>``, and exit with status 1.
Global options (before the command): ``--base-url`` and ``--api-key``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from eztinker.cli_common import (
    CliState,
    JsonOpt,
    NoWaitOpt,
    client_of,
    errors_as_one_line,
    fmt_loss,
    fmt_size,
    fmt_time,
    id_column,
    print_future,
    print_json,
    print_table,
    stdout_console,
    submit_run_op,
    wait_result,
)
from eztinker.cli_progress import (
    download_with_progress,
)
from eztinker.cli_service import models, status, wait
from eztinker.errors import NotFoundError
from eztinker.futures import APIFuture
from eztinker.history import loss_plot
from eztinker.sampling_client import split_checkpoint_path
from eztinker.service_client import ServiceClient


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


@errors_as_one_line
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
    service = client_of(ctx)
    body: dict[str, Any] = {"rank": rank}
    if model:
        body["base_model"] = model
    if seed is not None:
        body["seed"] = seed
    created = service.transport.request("POST", "/v1/runs", json=body)
    run_id = created["run_id"]
    if no_wait:
        if as_json:
            print_json(created)
        else:
            typer.echo(f"run {run_id} (creating; future {created['future_id']})")
        return
    future = APIFuture(service.transport, created["future_id"], op="create_run")
    wait_result(future, f"creating run {run_id}", as_json)
    info = service.get_run(run_id)
    if as_json:
        print_json(info)
        return
    typer.echo(f"created run {run_id}")
    typer.echo(f"  model {info.base_model}, LoRA rank {info.lora.rank}, worker {info.worker}")


@errors_as_one_line
def list_runs(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List training runs."""
    runs = client_of(ctx).list_runs()
    if as_json:
        print_json({"runs": runs})
        return
    if not runs:
        typer.echo("no runs")
        return
    table = Table(box=None, header_style="bold")
    id_column(table, "RUN")
    for header in ("MODEL", "STATUS", "STEP", "TOKENS", "LAST LOSS", "WORKER"):
        table.add_column(header, no_wrap=True)
    for r in runs:
        table.add_row(
            r.run_id, r.base_model, r.status, str(r.step), str(r.tokens_trained),
            fmt_loss(r.last_loss), r.worker,
        )  # fmt: skip
    print_table(stdout_console(), table)


def _checkpoint_table(checkpoints: list[Any]) -> Table:
    table = Table(box=None, header_style="bold")
    id_column(table, "PATH")
    for header in ("KIND", "STEP", "SIZE", "CREATED"):
        table.add_column(header, no_wrap=True)
    for c in checkpoints:
        table.add_row(c.path, c.kind, str(c.step), fmt_size(c.size_bytes), fmt_time(c.created_at))
    return table


@errors_as_one_line
def show(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run id.")],
    as_json: JsonOpt = False,
) -> None:
    """Show one run: status, step, tokens trained, last loss, checkpoints and its loss curve."""
    client = client_of(ctx)
    info = client.get_run(run)
    if as_json:
        print_json(info)
        return
    out = stdout_console()
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
        ("last loss", fmt_loss(info.last_loss)),
        ("last state", info.last_state or "-"),
        ("created", fmt_time(info.created_at)),
    ]
    if info.error:
        rows.append(("error", info.error))
    for key, value in rows:
        table.add_row(key, value)
    print_table(out, table)
    if info.checkpoints:
        out.print()
        print_table(out, _checkpoint_table(info.checkpoints))
    try:
        points = client.get_metrics(run)
    except NotFoundError:  # a server older than the metrics history: the table alone
        points = []
    plot = loss_plot(points, width=max(40, min(100, out.width)))
    if plot is not None:
        out.print()
        out.print(plot, markup=False, highlight=False, soft_wrap=True)


@errors_as_one_line
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
    service = client_of(ctx)
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
        print_future(future, as_json)
        return
    result = wait_result(future, "sampling", as_json)
    if as_json:
        print_json(result)
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


@errors_as_one_line
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
    service = client_of(ctx)
    kind = "sampler" if sampler else "state"
    future = submit_run_op(service, run, "save", {"name": name, "kind": kind})
    if no_wait:
        print_future(future, as_json)
        return
    info = wait_result(future, f"saving {run}/{name}", as_json)
    if as_json:
        print_json(info)
        return
    typer.echo(f"saved {info['path']} ({kind}, step {info.get('step', 0)})")


@errors_as_one_line
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
    service = client_of(ctx)
    if path is None:
        path = service.get_run(run).last_state
        if not path:
            raise ValueError(
                f"run {run} has no saved state of its own: name a checkpoint PATH "
                "(`eztinker checkpoints` lists them)"
            )
    future = submit_run_op(service, run, "load", {"path": path, "optimizer": not no_optimizer})
    if no_wait:
        print_future(future, as_json)
        return
    info = wait_result(future, f"loading {path} into {run}", as_json)
    if as_json:
        print_json(info)
        return
    worker = service.get_run(run).worker
    step = (info or {}).get("step", 0)
    typer.echo(f"loaded {path} into {run} (step {step}, worker {worker})")


@errors_as_one_line
def checkpoints(
    ctx: typer.Context,
    run: Annotated[str | None, typer.Argument(help="Run id (default: all runs).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List checkpoints (of one run, or of all)."""
    found = client_of(ctx).list_checkpoints(run)
    if as_json:
        print_json({"checkpoints": found})
        return
    if not found:
        typer.echo("no checkpoints")
        return
    print_table(stdout_console(), _checkpoint_table(found))


@errors_as_one_line
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
    service = client_of(ctx)
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
        print_json({"path": str(target), "files": files})
        return
    typer.echo(f"downloaded {path} to {target} ({len(files)} files)")


@errors_as_one_line
def delete(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run id.")],
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete a run (after its queued operations; checkpoints stay on disk)."""
    future = client_of(ctx).delete_run(run)
    if no_wait:
        print_future(future, as_json)
        return
    result = wait_result(future, f"deleting {run}", as_json)
    if as_json:
        print_json(result)
        return
    typer.echo(f"deleted run {run}")


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
