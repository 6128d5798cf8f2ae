"""WSGI entry point for gunicorn: ``gunicorn 'eztinker_web.wsgi:app'``."""

import sys

from eztinker_web.app import create_app

# gthread hands each request from the accepting thread to a worker thread; CPython's default
# 5 ms GIL switch interval would add up to that much latency to every request.
sys.setswitchinterval(0.0005)

app = create_app()
