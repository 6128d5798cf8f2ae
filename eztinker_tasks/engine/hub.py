"""Failing fast when a Hugging Face hub model cannot be fetched: the worker's side.

The check itself is torch-free and shared with the web process (``eztinker_tasks.hub_probe``):
a hub id neither in the local cache nor downloadable now is refused at once, not after the hub
client's ~45 s of retries that would stall every run on the worker. ``local_only`` tells the
loader to read a cached model without asking an unreachable hub (which would retry for minutes).
"""

from __future__ import annotations

from eztinker_tasks.hub_probe import ensure_fetchable, hub_offline, is_cached, reachable

__all__ = ["ensure_fetchable", "is_cached", "local_only", "reachable"]


def local_only(repo_id: str) -> bool:
    """Whether ``repo_id`` must be read from the local cache alone (cached; hub not reachable)."""
    if not is_cached(repo_id):
        return False
    if hub_offline():
        return True
    from huggingface_hub import constants

    return not reachable(constants.ENDPOINT)
