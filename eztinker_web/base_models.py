"""Which base model names the web accepts before any worker sees them (torch-free).

``check_model_name`` refuses at once a name no worker could load; ``check_local_model`` keeps
tenants to the model directories the operator allows (``EZTINKER_MODEL_DIRS``).
"""

from __future__ import annotations

from pathlib import Path

from eztinker_tasks import catalog, hub_probe, shapes
from eztinker_tasks.errors import InvalidRequest
from eztinker_web.auth import caller
from eztinker_web.services import services


def check_model_name(name: str) -> None:
    """Reject at once a base model that no worker could load.

    Accepted: a built-in model, one a worker has loaded before, a local directory, or a hub id
    that is in the local Hugging Face cache or downloadable now (the worker's own check, asked
    here: torch-free, its hub probe remembered for a minute). Else InvalidRequest (400, not a
    model name) or UnknownModel (404, a hub id that cannot be fetched, saying what to use).
    """
    if name in catalog.BUILTIN_MODELS:
        return
    if Path(name).is_dir():
        check_local_model(name)
        return
    if services().store.get_model(name) is not None:
        return
    try:
        if shapes.check(name) is not None:  # a random-weight base of a real shape
            return
    except ValueError as exc:
        raise InvalidRequest(str(exc), errors={"base_model": ["unknown shape"]}) from None
    if catalog.is_hub_id(name):
        hub_probe.ensure_fetchable(name, where="the server")
        return
    known = ", ".join(sorted(catalog.BUILTIN_MODELS))
    raise InvalidRequest(
        f"unknown base_model {name!r}: not a built-in model ({known}), a local model directory "
        "or a Hugging Face model id",
        errors={"base_model": ["unknown model"]},
    )


def check_local_model(name: str) -> None:
    """A local model directory as a base: any for admin keys and when auth is off; for other
    tenants only under ``EZTINKER_MODEL_DIRS`` (a tenant must not make workers read any
    directory of the server). Raises InvalidRequest (400) naming the setting."""
    if caller().sees_all:
        return
    roots = services().settings.model_dirs
    path = Path(name).resolve()
    if any(path.is_relative_to(root) for root in roots):
        return
    where = ", ".join(str(r) for r in roots) or "none is set"
    raise InvalidRequest(
        f"base_model {name!r} is a local directory outside EZTINKER_MODEL_DIRS ({where}): with "
        "API keys on, a tenant may name only model directories under it; use a built-in "
        "model or a Hugging Face model id, or ask the operator to add the directory",
        errors={"base_model": ["local directory not allowed"]},
    )
