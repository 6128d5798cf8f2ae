"""Whether a Hugging Face hub model can be loaded now: in the local cache, or the hub reachable.

Torch-free (``huggingface_hub`` and ``requests`` only, imported on first use), so the web
process asks it before accepting a run or a sample on a hub model: a model that no worker could
load is refused at submit (404 ``unknown_model``) instead of becoming a run that fails later.
The worker asks the same question before ``from_pretrained`` (``engine/hub.py``).

Without a network the hub client gives up only after its own timeouts and retries (about 45 s),
so the probe is one HEAD with a short timeout, through the same proxy settings, and its answer
is remembered for a minute per endpoint (thread-safe: the web asks from many threads).
"""

from __future__ import annotations

import os
import threading
import time

from eztinker_tasks import catalog
from eztinker_tasks.errors import UnknownModel

PROBE_TIMEOUT_S = 3.0
PROBE_TTL_S = 60.0

_lock = threading.Lock()
_probes: dict[str, tuple[float, bool]] = {}  # endpoint -> (when, reachable)


def is_cached(repo_id: str) -> bool:
    """Whether the model's config is in the local Hugging Face cache (``HF_HUB_CACHE``)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed id or an unreadable cache: not usable offline
        return False


def reachable(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether ``endpoint`` answers HTTP at all (any status counts), remembered for a minute."""
    now = time.monotonic()
    with _lock:
        seen = _probes.get(endpoint)
        if seen is not None and now - seen[0] < PROBE_TTL_S:
            return seen[1]
    import requests

    try:
        requests.head(endpoint, timeout=timeout_s, allow_redirects=False)
        ok = True
    except requests.RequestException:
        ok = False
    with _lock:
        _probes[endpoint] = (time.monotonic(), ok)
    return ok


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def ensure_fetchable(repo_id: str, endpoint: str | None = None, where: str = "here") -> None:
    """Raise ``UnknownModel`` (404, user) at once if ``repo_id`` is neither cached nor fetchable.

    ``endpoint`` defaults to the hub client's (``HF_ENDPOINT``); ``where`` names the asking
    process in the message ("the server", "this worker").
    """
    if is_cached(repo_id):
        return
    if endpoint is None:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    offline = hub_offline()
    if not offline and reachable(endpoint):
        return
    why = "HF_HUB_OFFLINE is set" if offline else f"{endpoint} cannot be reached from {where}"
    builtins = ", ".join(sorted(catalog.BUILTIN_MODELS))
    raise UnknownModel(
        f"model {repo_id!r} is not in the local Hugging Face cache and {why}; use a built-in "
        f"model ({builtins}), a local model directory, or download it into the cache first",
        errors={"base_model": [f"not available offline: {repo_id}"]},
    )
