"""The RestClient's listings on ``/api/v1``: training runs, their checkpoints, weights info.

A training run is an EZTinker run of the caller's tenant (its Tinker model id when it was made
through ``/api/v1``, else its run id); its checkpoints are the run's, with ``tinker://`` paths.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import jsonify, request

from eztinker_tasks.errors import InvalidRequest
from eztinker_tasks.store import RunRecord
from eztinker_tasks.types import CheckpointInfo
from eztinker_web import dispatch, tenancy
from eztinker_web.checkpoints.listing import delete_checkpoint, list_checkpoints
from eztinker_web.services import services
from eztinker_web.tinker_api import paths
from eztinker_web.tinker_api.wire import blp, body_of, field


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _checkpoint(info: CheckpointInfo) -> dict[str, Any]:
    tinker_path = paths.from_checkpoint(info)
    parsed = paths.parse(tinker_path)
    return {
        "checkpoint_id": f"{parsed.segment}/{parsed.name}",
        "checkpoint_type": "sampler" if info.kind == "sampler" else "training",
        "time": _time(info.created_at),
        "tinker_path": tinker_path,
        "size_bytes": info.size_bytes,
    }


def _training_run(record: RunRecord) -> dict[str, Any]:
    checkpoints = list_checkpoints(services().settings, record.run_id)
    last = {kind: None for kind in ("state", "sampler")}
    for info in checkpoints:  # oldest first: the last one of each kind wins
        last[info.kind] = _checkpoint(info)
    times = [record.created_at, *(c.created_at for c in checkpoints)]
    return {
        "training_run_id": paths.training_run_id_of(record.run_id),
        "base_model": record.base_model,
        "model_owner": record.tenant,
        "is_lora": True,
        "corrupted": record.status == "failed",
        "lora_rank": record.lora.get("rank"),
        "last_request_time": _time(max(times)),
        "last_checkpoint": last["state"],
        "last_sampler_checkpoint": last["sampler"],
    }


def _int_arg(name: str, default: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise InvalidRequest(f"{name} must be a non-negative integer", errors={name: []})
    return int(raw)


@blp.get("/training_runs")
def list_training_runs():
    """The caller's runs, oldest first, ``limit``/``offset`` paged."""
    limit, offset = _int_arg("limit", 20), _int_arg("offset", 0)
    records = [r for r in tenancy.seen_runs(services().store.list_runs()) if r.status != "deleted"]
    records.sort(key=lambda r: r.created_at)
    page = [_training_run(r) for r in records[offset : offset + limit]]
    cursor = {"offset": offset, "limit": limit, "total_count": len(records)}
    return jsonify({"training_runs": page, "cursor": cursor})


@blp.get("/training_runs/<training_run_id>")
def get_training_run(training_run_id: str):
    """One training run (404 if unknown, deleted or another tenant's)."""
    return jsonify(_training_run(dispatch.live_run(paths.run_id_of(training_run_id))))


@blp.get("/training_runs/<training_run_id>/checkpoints")
def list_run_checkpoints(training_run_id: str):
    """A run's checkpoints, oldest first."""
    record = dispatch.live_run(paths.run_id_of(training_run_id))
    infos = list_checkpoints(services().settings, record.run_id)
    return jsonify({"checkpoints": [_checkpoint(i) for i in infos]})


@blp.delete("/training_runs/<training_run_id>/checkpoints/<path:checkpoint_id>")
def delete_run_checkpoint(training_run_id: str, checkpoint_id: str):
    """Delete ``weights/<name>`` or ``sampler_weights/<name>`` of a run."""
    info = paths.to_checkpoint(f"{paths.SCHEME}{training_run_id}/{checkpoint_id}")
    delete_checkpoint(services().settings, info.path)
    return jsonify({})


@blp.post("/weights_info")
def weights_info():
    """The base model and LoRA shape of a ``tinker://`` checkpoint."""
    info = paths.to_checkpoint(field(body_of(), "tinker_path", str))
    lora = paths.lora_of(info)
    return jsonify(
        {
            "base_model": info.base_model,
            "is_lora": True,
            "lora_rank": lora.rank,
            "train_unembed": lora.train_unembed,
            "train_mlp": lora.train_mlp,
            "train_attn": lora.train_attn,
        }
    )
