"""What the client commands of ``eztinker`` share: the CLI's state, its retry policy, printing
(tables, JSON, one-line errors), waiting for futures and formatting values."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, cast

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from eztinker.cli_progress import wait_for
from eztinker.errors import EZTinkerAPIError, EZTinkerError
from eztinker.futures import APIFuture
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


def client_of(ctx: typer.Context) -> ServiceClient:
    state = ctx.find_object(CliState) or CliState()
    return ServiceClient(state.base_url, state.api_key, retry=CLI_RETRY)


def stdout_console() -> Console:
    return Console(soft_wrap=False)


def print_table(console: Console, table: Table) -> None:
    """Print at the table's natural width, even past the terminal's: ids are never cut."""
    need = Measurement.get(console, console.options.update(width=100_000), table).maximum
    console.width = max(console.width, need)
    console.print(table, crop=False)


def plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def print_json(value: Any) -> None:
    typer.echo(json.dumps(plain(value), indent=2, default=plain))


def fail(
    message: str, as_json: bool, error: dict[str, Any] | None = None, hint: str | None = None
) -> typer.Exit:
    if as_json:
        print_json({"error": error or {"message": message}})
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


# Hints that need no run id.
_HINTS = {
    "too_many_runs": "`eztinker list` shows your runs; `eztinker delete RUN` frees one",
    "too_many_queued_ops": "your tenant's operations are still running; wait for them "
    "(`eztinker wait FUTURE`) and retry",
}


def hint_for(exc: EZTinkerAPIError, run: Any) -> str | None:
    template = _RUN_HINTS.get(exc.code)
    if template and isinstance(run, str):
        return template.format(run=run)
    return _HINTS.get(exc.code)


def errors_as_one_line(fn: F) -> F:
    """Turn client errors into ``error: <message>`` and exit status 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except EZTinkerAPIError as exc:
            hint = hint_for(exc, kwargs.get("run"))
            raise fail(exc.message, as_json, exc.to_dict(), hint) from None
        except (EZTinkerError, ValueError, TimeoutError, OSError) as exc:
            raise fail(str(exc) or type(exc).__name__, as_json) from None
        except KeyboardInterrupt:
            raise fail("interrupted", as_json) from None

    return cast(F, wrapper)


def wait_result(future: APIFuture[Any], what: str, as_json: bool) -> Any:
    """Wait for ``future`` with a progress bar on stderr (none in --json mode)."""
    return wait_for(future, what, as_json)


def print_future(future: APIFuture[Any], as_json: bool) -> None:
    if as_json:
        print_json({"future_id": future.future_id, "run_id": future.run_id})
    else:
        typer.echo(future.future_id)


def fmt_loss(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def fmt_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def id_column(table: Table, header: str) -> None:
    table.add_column(header, no_wrap=True, style="cyan")


def submit_run_op(
    service: ServiceClient, run_id: str, op: str, body: dict[str, Any]
) -> APIFuture[Any]:
    sent = service.transport.request("POST", f"/v1/runs/{run_id}/{op}", json=body)
    return APIFuture(service.transport, sent["future_id"], op=op, run_id=run_id)


# -- commands ----------------------------------------------------------------------------------
