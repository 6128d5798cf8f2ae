"""WSGI entry point for gunicorn: ``gunicorn 'eztinker_web.wsgi:app'``."""

from eztinker_web.app import create_app

app = create_app()
