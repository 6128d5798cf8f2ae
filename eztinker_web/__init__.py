"""EZTinker's HTTP API: a Flask app that validates requests and dispatches Celery tasks.

It never touches a GPU and never blocks on a task result.
"""

from eztinker_web.app import create_app

__all__ = ["create_app"]
