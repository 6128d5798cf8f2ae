"""Failing fast when a Hugging Face hub model cannot be fetched.

Without a network, ``from_pretrained("gpt2")`` gives up only after its own timeouts and retries
(about 45 s here), and a worker runs one operation at a time: every other run on it would wait
that long. So before loading a hub id that is not in the local Hugging Face cache, the worker
asks the hub once (a HEAD with a short timeout, through the same proxy settings) and, if it
cannot be reached, refuses at once with what to do instead. The answer is remembered for a
minute.
"""

from __future__ import annotations

import os
import threading
import time

import requests
from huggingface_hub import constants, try_to_load_from_cache

from eztinker_tasks import catalog
from eztinker_tasks.errors import UnknownModel

PROBE_TIMEOUT_S = 3.0
PROBE_TTL_S = 60.0

_lock = threading.Lock()
_probes: dict[str, tuple[float, bool]] = {}  # endpoint -> (when, reachable)


def is_cached(repo_id: str) -> bool:
    """Whether the model's config is in the local Hugging Face cache."""
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
    try:
        requests.head(endpoint, timeout=timeout_s, allow_redirects=False)
        ok = True
    except requests.RequestException:
        ok = False
    with _lock:
        _probes[endpoint] = (time.monotonic(), ok)
    return ok


def ensure_fetchable(repo_id: str, endpoint: str | None = None) -> None:
    """Raise UnknownModel at once if ``repo_id`` is neither cached nor downloadable now."""
    if is_cached(repo_id):
        return
    endpoint = endpoint or constants.ENDPOINT
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline and reachable(endpoint):
        return
    why = "HF_HUB_OFFLINE is set" if offline else f"{endpoint} cannot be reached from this worker"
    builtins = ", ".join(sorted(catalog.BUILTIN_MODELS))
    raise UnknownModel(
        f"model {repo_id!r} is not in the local Hugging Face cache and {why}; use a built-in "
        f"model ({builtins}), a local model directory, or download it into the cache first",
        errors={"base_model": [f"not available offline: {repo_id}"]},
    )
