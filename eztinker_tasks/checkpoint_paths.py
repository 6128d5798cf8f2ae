"""Checkpoint names and paths: validated here, once, for the web and the engine alike.

A checkpoint lives in ``CHECKPOINTS_DIR/<run_id>/<name>/``; its portable path is
``"<run_id>/<name>"`` (an ``eztinker://`` prefix is accepted). Names and run ids are short
tokens of letters, digits, ``.``, ``_`` and ``-`` that cannot start with a dot, so no path can
escape the checkpoints directory.
"""

from __future__ import annotations

import re
from pathlib import Path

from eztinker_tasks.errors import InvalidRequest

SCHEME = "eztinker://"
MAX_NAME_LENGTH = 128
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}$")


def validate_name(name: str, field: str = "name") -> str:
    """Return ``name`` if it is a safe single path component, else raise InvalidRequest."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"{field} must be a non-empty string", errors={field: ["empty"]})
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidRequest(
            f"{field} is longer than {MAX_NAME_LENGTH} characters", errors={field: ["too long"]}
        )
    if ".." in name or not _NAME_RE.match(name):
        raise InvalidRequest(
            f"{field} {name!r} may only hold letters, digits, '.', '_' and '-', "
            "must not start with '.', and must not contain '..'",
            errors={field: ["invalid characters"]},
        )
    return name


def format_path(run_id: str, name: str) -> str:
    return f"{run_id}/{name}"


def parse_path(path: str) -> tuple[str, str]:
    """Split ``"[eztinker://]<run_id>/<name>"`` into validated parts."""
    if not isinstance(path, str):
        raise InvalidRequest("path must be a string", errors={"path": ["not a string"]})
    raw = path[len(SCHEME) :] if path.startswith(SCHEME) else path
    parts = raw.split("/")
    if len(parts) != 2:
        raise InvalidRequest(
            f"checkpoint path {path!r} must look like '<run_id>/<name>'",
            errors={"path": ["expected <run_id>/<name>"]},
        )
    return validate_name(parts[0], "path"), validate_name(parts[1], "path")


def resolve(checkpoints_dir: Path, path: str) -> Path:
    """The directory of checkpoint ``path``, guaranteed to lie inside ``checkpoints_dir``."""
    run_id, name = parse_path(path)
    root = Path(checkpoints_dir).resolve()
    target = (root / run_id / name).resolve()
    if root not in target.parents:
        raise InvalidRequest(f"checkpoint path {path!r} escapes the checkpoints directory")
    return target
