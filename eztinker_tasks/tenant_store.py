"""What the store knows of tenants: who owns a run, and what a tenant's limits count (its runs
that are not deleted, and its unfinished ops).

``Store.put_run`` adds a run to ``tenant_runs_key`` (refusing it at the run limit) and marking
a run deleted removes it, in the same transaction. ``Store.submit_op`` / ``queue_op`` add an op
to ``tenant_ops_key`` (refusing it at the op limit) while a limit is set; nothing removes it
when it finishes (the worker's hot path is left alone). So both counts can only be too high,
never too low, and a tenant is refused only after ``prune_runs`` / ``drop_ops`` have taken out
what is over: the caller prunes when the store says the limit is reached, then tries once more.
"""

from __future__ import annotations

import json

from eztinker_tasks.store import Store
from eztinker_tasks.store_records import P, RunRecord, _text, tenant_ops_key, tenant_runs_key


def run_owners(store: Store, run_ids: list[str]) -> dict[str, str | None]:
    """The tenant of each run, in one round trip (None: no record of the run)."""
    if not run_ids:
        return {}
    raws = store.r.mget([f"{P}:run:{i}" for i in run_ids])
    return {
        i: RunRecord.from_json(raw).tenant if raw else None
        for i, raw in zip(run_ids, raws, strict=True)
    }


def prune_runs(store: Store, tenant: str) -> int:
    """Drop the tenant's runs that are deleted (or gone) from its count; return the count."""
    key = tenant_runs_key(tenant)
    ids = sorted(_text(i) for i in store.r.smembers(key))
    if not ids:
        return 0
    pipe = store.r.pipeline(transaction=False)
    for run_id in ids:
        pipe.get(f"{P}:run:{run_id}")
        pipe.hget(f"{P}:run:{run_id}:stats", "status")
    out = pipe.execute()
    over = []
    for run_id, raw, status in zip(ids, out[::2], out[1::2], strict=True):
        if not raw:
            over.append(run_id)
            continue
        shown = json.loads(status) if status else RunRecord.from_json(raw).status
        if shown == "deleted":
            over.append(run_id)
    if over:
        store.r.srem(key, *over)
    return len(ids) - len(over)


def counted_ops(store: Store, tenant: str) -> list[str]:
    """The future ids the tenant's op count holds now (finished ones among them, until dropped)."""
    return [_text(i) for i in store.r.zrange(tenant_ops_key(tenant), 0, -1)]


def drop_ops(store: Store, tenant: str, future_ids: list[str]) -> None:
    """Take finished ops out of the tenant's op count."""
    if future_ids:
        store.r.zrem(tenant_ops_key(tenant), *future_ids)
