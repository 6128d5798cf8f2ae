"""The client commands of ``eztinker`` about the service rather than one run: ``status``
(workers, runs, queues), ``models`` and ``wait`` (for any future)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from eztinker.cli_common import (
    JsonOpt,
    client_of,
    errors_as_one_line,
    id_column,
    print_json,
    print_table,
    stdout_console,
)
from eztinker.cli_progress import (
    cost_lines,
    summary_lines,
    wait_for_until,
)


@errors_as_one_line
def status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Show the service: broker, workers, the runs they hold and their queue depths."""
    service = client_of(ctx)
    health = service.health()
    ok = health.get("status") == "ok"
    if as_json:
        print_json(health)
        raise typer.Exit(0 if ok else 1)
    out = stdout_console()
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
        id_column(table, "WORKER")
        table.add_column("DEVICE", no_wrap=True)
        table.add_column("HEARTBEAT", no_wrap=True)
        id_column(table, "QUEUE")
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
        print_table(out, table)
    if not ok:
        raise typer.Exit(1)


@errors_as_one_line
def models(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the models the server can train and sample."""
    caps = client_of(ctx).get_server_capabilities()
    if as_json:
        print_json(caps)
        return
    table = Table(box=None, header_style="bold")
    id_column(table, "MODEL")
    for header in ("ARCH", "VOCAB", "CONTEXT", "DEFAULT"):
        table.add_column(header, no_wrap=True)
    table.add_column("DESCRIPTION", no_wrap=True)
    for m in caps.supported_models:
        default = "*" if m.name == caps.default_model else ""
        table.add_row(
            m.name, m.architecture, str(m.vocab_size), str(m.max_context), default, m.description
        )
    print_table(stdout_console(), table)


@errors_as_one_line
def wait(
    ctx: typer.Context,
    future_id: Annotated[str, typer.Argument(help="A future id printed by --no-wait.")],
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Wait for an operation (a progress bar meanwhile) and summarise its result.

    ``--json`` prints the whole result instead (every logprob of a forward pass, ...).
    """
    future = client_of(ctx).get_future(future_id)
    if as_json:
        print_json(future.result(timeout))
        return
    result = wait_for_until(future, f"waiting for {future_id}", timeout)
    for line in summary_lines(future.op, result) + cost_lines(result, future.timing):
        typer.echo(line)
    typer.secho("(--json prints the whole result)", dim=True, err=True)
