"""Tinker's own wire protocol under ``/api/v1``: the official ``tinker`` SDK against EZTinker.

A thin translation: every operation is the ``/v1`` one (``dispatch``, the runs' checks, the
futures), only the wire format differs. See ``routes`` for the endpoints and why they are
kept out of ``/openapi.json``.
"""


def blueprint():
    """The ``/api/v1`` blueprint with every route module's routes on it."""
    from eztinker_web.tinker_api import rest, routes, sampling  # noqa: F401  (they add routes)
    from eztinker_web.tinker_api.wire import blp

    return blp
