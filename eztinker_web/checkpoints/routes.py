"""Checkpoints on disk: list, delete, and download as a tar.gz archive.

A checkpoint is its run's tenant's: lists show the caller's only, and another tenant's answers
404 as a missing one does.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path

from flask import Response, send_file

from eztinker_tasks import checkpoint_paths
from eztinker_tasks.errors import UnknownRun
from eztinker_web.blueprint import Blueprint
from eztinker_web.checkpoints.listing import delete_checkpoint, get_checkpoint, list_checkpoints
from eztinker_web.checkpoints.schemas import CheckpointListSchema, CheckpointSchema
from eztinker_web.services import services
from eztinker_web.tenancy import check_run_checkpoints, seen_checkpoints

blp = Blueprint("checkpoints", __name__, url_prefix="/v1", description="Checkpoints on disk")


@blp.route("/checkpoints", methods=["GET"])
@blp.response(200, CheckpointListSchema)
def all_checkpoints():
    """Every checkpoint of the caller's runs (deleted runs' checkpoints stay)."""
    found = seen_checkpoints(list_checkpoints(services().settings))
    return {"checkpoints": [c.to_dict() for c in found]}


@blp.route("/runs/<run_id>/checkpoints", methods=["GET"])
@blp.response(200, CheckpointListSchema)
@blp.errors(400, 404)
def run_checkpoints(run_id: str):
    """The checkpoints of one run (a deleted run's too); 404 for a run never created."""
    checkpoint_paths.validate_name(run_id, "run_id")
    check_run_checkpoints(run_id)
    svc = services()
    found = list_checkpoints(svc.settings, run_id)
    if not found and svc.store.get_run(run_id) is None:
        raise UnknownRun(f"unknown run {run_id!r}", errors={"run_id": ["not found"]})
    return {"checkpoints": [c.to_dict() for c in found]}


@blp.route("/runs/<run_id>/checkpoints/<name>", methods=["GET"])
@blp.response(200, CheckpointSchema)
@blp.errors(400, 404)
def get_one(run_id: str, name: str):
    """One checkpoint's metadata."""
    return get_checkpoint(services().settings, checkpoint_paths.format_path(run_id, name)).to_dict()


@blp.route("/runs/<run_id>/checkpoints/<name>", methods=["DELETE"])
@blp.response(200, CheckpointSchema)
@blp.errors(400, 404)
def delete_one(run_id: str, name: str):
    """Delete one checkpoint from disk. Where it was the run's ``last_state``, the newest
    state checkpoint left (or none) becomes it."""
    svc = services()
    path = checkpoint_paths.format_path(run_id, name)
    info = delete_checkpoint(svc.settings, path)
    if info.kind == "state":
        left = [c for c in list_checkpoints(svc.settings, run_id) if c.kind == "state"]
        newest = max(left, key=lambda c: c.created_at, default=None)
        svc.store.replace_last_state(run_id, path, newest.path if newest else None)
    return info.to_dict()


@blp.route("/runs/<run_id>/checkpoints/<name>/archive", methods=["GET"])
@blp.response(200, content_type="application/gzip")
@blp.errors(400, 404)
def archive(run_id: str, name: str) -> Response:
    """Stream the checkpoint directory as `<run_id>-<name>.tar.gz`."""
    info = get_checkpoint(services().settings, checkpoint_paths.format_path(run_id, name))
    spool = tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024)  # noqa: SIM115
    with tarfile.open(fileobj=spool, mode="w:gz") as tar:
        directory = Path(info.directory)
        for file in sorted(directory.rglob("*")):
            if file.is_file() and not file.is_symlink():
                tar.add(file, arcname=f"{name}/{file.relative_to(directory)}")
    size = spool.tell()
    spool.seek(0)
    response = send_file(
        io.BufferedReader(spool),  # type: ignore[arg-type]
        mimetype="application/gzip",
        as_attachment=True,
        download_name=f"{run_id}-{name}.tar.gz",
    )
    response.headers["Content-Length"] = str(size)
    return response
