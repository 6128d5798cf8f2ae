"""API keys and who is calling: the tenant a ``/v1`` or ``/api/v1`` request acts for.

When keys are configured (``EZTINKER_API_KEYS`` / ``EZTINKER_API_KEYS_FILE``, see
``config.tenants``), every ``/v1`` and ``/api/v1`` (Tinker's protocol) request must carry
one: ``Authorization: Bearer <key>`` (what the ``openai`` client sends under ``/openai/v1``)
or ``X-API-Key: <key>``; ``/health`` and the docs stay
open. The key names the request's ``Caller``: its tenant, whether it sees every tenant's
objects (an ``admin`` key), and whether the per-tenant limits apply to it. With no keys
configured, auth is off and every request is the one ``default`` tenant, which sees
everything (as before tenants existed).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from flask import Flask, g, jsonify, request

from config.tenants import ADMIN_TENANT, DEFAULT_TENANT
from eztinker_web.errors import envelope


@dataclass(frozen=True)
class Caller:
    """Who a request acts for.

    ``tenant`` owns what the request creates; ``sees_all``: it reads and acts on every
    tenant's objects (admin keys, and everyone when auth is off); ``limited``: the per-tenant
    run and op limits apply to it (not to admin keys).
    """

    tenant: str
    sees_all: bool = False
    limited: bool = True

    def sees(self, owner: str | None) -> bool:
        """Whether an object owned by ``owner`` exists for this caller (None: owner unknown,
        e.g. a checkpoint whose run record is gone: only callers who see all see it)."""
        return self.sees_all or (owner is not None and owner == self.tenant)

    @classmethod
    def of_tenant(cls, tenant: str) -> Caller:
        if tenant == ADMIN_TENANT:
            return cls(tenant, sees_all=True, limited=False)
        return cls(tenant)


AUTH_OFF = Caller(DEFAULT_TENANT, sees_all=True, limited=True)


def caller() -> Caller:
    """The caller of the current request (``AUTH_OFF`` when auth is off)."""
    return g.get("caller", AUTH_OFF)


def install_auth(app: Flask, keys: Mapping[str, str]) -> None:
    """Require one of ``keys`` (key -> tenant) on every ``/v1`` request; no keys: auth off."""
    if not keys:
        return
    table = [(key.encode(), Caller.of_tenant(tenant)) for key, tenant in keys.items()]

    @app.before_request
    def _check_key():
        if not request.path.startswith(("/v1", "/api/v1", "/openai/")):
            return None
        header = request.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else request.headers.get("X-API-Key")
        if given:
            found = None
            for key, who in table:  # compare with every key: the time says nothing of which
                if hmac.compare_digest(given.encode(), key):
                    found = who
            if found is not None:
                g.caller = found
                return None
        body = envelope(401, "unauthorized", "missing or invalid API key")
        return jsonify(body), 401
