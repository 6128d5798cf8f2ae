"""The ``eztinker`` command line: service commands (server, worker, ...) and client commands."""

from __future__ import annotations

import typer

from eztinker.cli_client import register as register_client_commands

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="EZTinker: LoRA training ops on GPUs."
)


@app.command()
def server(
    port: int = typer.Option(None, help="Web port (default EZTINKER_PORT or 8000)"),
    host: str = typer.Option(None, help="Web host (default EZTINKER_HOST or localhost)"),
    workers: int = typer.Option(
        None, help="Worker processes (default 1; N spreads them over the GPUs)"
    ),
    no_flower: bool = typer.Option(False, "--no-flower", help="Do not start Flower"),
    device: str = typer.Option(None, help="Force a device for all workers (cpu, cuda)"),
) -> None:
    """Start the whole service: broker, web, worker(s) and Flower."""
    from eztinker.server import serve

    raise typer.Exit(
        serve(host=host, port=port, workers=workers, flower=not no_flower, device=device)
    )


@app.command()
def worker(
    name: str = typer.Option("gpu0", help="Node name prefix (gpu0, cpu0, ...)"),
    device: str = typer.Option(None, help="cpu, cuda or cuda:N (default EZTINKER_DEVICE)"),
    loglevel: str = typer.Option("INFO", help="Log level"),
    events: bool = typer.Option(False, "--events", help="Send task events (for Flower)"),
) -> None:
    """Start one worker process (one per GPU: set CUDA_VISIBLE_DEVICES)."""
    from eztinker.processes import run_worker

    run_worker(name, device, loglevel, events)


@app.command()
def broker() -> None:
    """Run the embedded broker in the foreground (for the Procfile)."""
    from eztinker.processes import run_broker

    raise typer.Exit(run_broker())


@app.command()
def web(
    port: int = typer.Option(None, help="Port"), host: str = typer.Option(None, help="Host")
) -> None:
    """Run the web API alone (gunicorn, gthread)."""
    from eztinker.processes import run_web

    run_web(host, port)


@app.command()
def flower() -> None:
    """Run Flower on 127.0.0.1:EZTINKER_FLOWER_PORT."""
    from eztinker.processes import run_flower

    run_flower()


register_client_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
