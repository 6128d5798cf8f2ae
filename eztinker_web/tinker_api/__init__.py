"""Tinker's own wire protocol under ``/api/v1``: the official ``tinker`` SDK against EZTinker.

A thin translation: every operation is the ``/v1`` one (``dispatch``, the runs' checks, the
futures), only the wire format differs. See ``routes`` for the endpoints and why they are
kept out of ``/openapi.json``.
"""
