"""The Flask application factory.

``create_app(settings)`` wires the blueprints (one per resource), the error envelope, auth, the
body-size limit, the offline OpenAPI docs at ``/docs`` (Swagger UI assets served from the
``swagger-ui-bundle`` package, so no CDN is needed) and the web console at ``/console``, which
``/`` leads to. Nothing here imports torch.
"""

from __future__ import annotations

from flask import Flask, redirect, send_from_directory

from config import Settings
from eztinker_tasks.tokenization import TokenizerCache
from eztinker_web.auth import install_auth
from eztinker_web.errors import EZTinkerApi, register_error_handlers, require_json_bodies
from eztinker_web.services import Services

DOCS_ASSETS = "/docs/assets/"


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask("eztinker_web")
    app.config.update(
        API_TITLE="EZTinker",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        OPENAPI_SWAGGER_UI_URL=DOCS_ASSETS,
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        JSON_SORT_KEYS=False,
    )
    app.json.sort_keys = False  # ty: ignore[missing-attribute]
    app.extensions["eztinker"] = Services(
        settings, TokenizerCache(settings.data_dir, settings.checkpoints_dir)
    )

    api = EZTinkerApi(app)
    from eztinker_web.checkpoints.routes import blp as checkpoints_blp
    from eztinker_web.futures.routes import blp as futures_blp
    from eztinker_web.health.routes import blp as health_blp
    from eztinker_web.history.routes import blp as history_blp
    from eztinker_web.models.routes import blp as models_blp
    from eztinker_web.runs.routes import blp as runs_blp
    from eztinker_web.sampling.routes import blp as sampling_blp

    for blp in (
        health_blp,
        models_blp,
        runs_blp,
        history_blp,
        futures_blp,
        sampling_blp,
        checkpoints_blp,
    ):
        api.register_blueprint(blp)
    from eztinker_web.tinker_api import blueprint as tinker_blueprint

    # Tinker's wire format, for the official SDK: not in the spec (``tinker_api.routes`` says why)
    app.register_blueprint(tinker_blueprint())
    from eztinker_web import openai as openai_api
    from eztinker_web.openai import errors as openai_errors

    # OpenAI's API under /openai/v1: not in the spec either (``openai.routes`` says why)
    app.register_blueprint(openai_api.blueprint())
    openai_errors.install(app)
    register_error_handlers(app)
    install_auth(app, settings.key_tenants())
    require_json_bodies(app)

    from swagger_ui_bundle import swagger_ui_path

    assets = str(swagger_ui_path)

    @app.get(DOCS_ASSETS + "<path:filename>")
    def docs_assets(filename: str):
        return send_from_directory(assets, filename)

    from eztinker_web.console.routes import bp as console_bp

    app.register_blueprint(console_bp)  # the web console: pages over this same API

    @app.get("/")
    def index():
        return redirect("/console")

    return app
