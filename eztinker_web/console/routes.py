"""The web console at ``/console``: runs, one run, a sampling playground, workers.

Each page is a Jinja template rendered here with no tenant data in it; the page's script
(``static/console.js``) reads everything from the JSON API under ``/v1`` (and ``/health``),
polling for live updates, with the API key the user gives it (kept in the browser's
``localStorage`` and sent as ``Authorization: Bearer``) when keys are on. So the console shows
exactly what the key's tenant sees through the API, and nothing else. Its scripts, styles and
the charting library (uPlot, vendored: ``static/vendor/README.md``) ship with the package: it
works offline. Not part of the OpenAPI spec.
"""

from __future__ import annotations

from flask import Blueprint, Response, render_template, request

from eztinker_tasks import checkpoint_paths
from eztinker_web.services import services

bp = Blueprint(
    "console",
    __name__,
    url_prefix="/console",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)


def page(template: str, **context: object) -> Response:
    settings = services().settings
    flower = f"{request.scheme}://{request.host.rsplit(':', 1)[0]}:{settings.flower_port}/"
    html = render_template(
        f"console/{template}",
        flower_url=flower,
        auth_on=bool(settings.key_tenants()),
        **context,
    )
    response = Response(html, mimetype="text/html")
    # Scripts and styles only from this server: the console loads nothing from elsewhere.
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        "connect-src 'self'; object-src 'none'; frame-ancestors 'none'"
    )
    return response


@bp.get("")
@bp.get("/")
def runs() -> Response:
    return page("runs.html", title="Runs")


@bp.get("/runs/<run_id>")
def run(run_id: str) -> Response:
    checkpoint_paths.validate_name(run_id, "run_id")  # a 400 for a name no run can have
    return page("run.html", title=f"Run {run_id}", run_id=run_id)


@bp.get("/playground")
def playground() -> Response:
    return page("playground.html", title="Playground")


@bp.get("/workers")
def workers() -> Response:
    return page("workers.html", title="Workers")
