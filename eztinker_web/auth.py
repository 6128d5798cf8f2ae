"""API keys: when ``EZTINKER_API_KEYS`` is set, every ``/v1`` request must carry one.

Send ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. ``/health`` and the docs stay open.
"""

from __future__ import annotations

import hmac

from flask import Flask, jsonify, request

from eztinker_web.errors import envelope


def install_auth(app: Flask, keys: tuple[str, ...]) -> None:
    if not keys:
        return
    encoded = [k.encode() for k in keys]

    @app.before_request
    def _check_key():
        if not request.path.startswith("/v1"):
            return None
        header = request.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else request.headers.get("X-API-Key")
        if given and any(hmac.compare_digest(given.encode(), k) for k in encoded):
            return None
        body = envelope(401, "unauthorized", "missing or invalid API key")
        return jsonify(body), 401
