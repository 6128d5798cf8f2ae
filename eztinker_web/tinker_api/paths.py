"""``tinker://`` paths onto EZTinker checkpoints and back.

``tinker://<training_run_id>/weights/<name>`` is the state checkpoint ``<run_id>/<name>``;
``tinker://<training_run_id>/sampler_weights/<name>`` is the sampler checkpoint
``<run_id>/<name>.sampler`` (Tinker keeps the two kinds apart, EZTinker has one name space per
run; a ``/v1`` sampler checkpoint without the suffix is found too). The training run id is the
Tinker model id of a run made through ``/api/v1`` and the run id of any other run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from eztinker_tasks import checkpoint_paths
from eztinker_tasks.errors import InvalidRequest, NotFound
from eztinker_tasks.types import CheckpointInfo, LoraSpec
from eztinker_web.checkpoints.listing import META_FILES, get_checkpoint
from eztinker_web.services import services
from eztinker_web.tinker_api import state

SCHEME = "tinker://"
SAMPLER_SUFFIX = ".sampler"
SEGMENTS = {"weights": "state", "sampler_weights": "sampler"}


@dataclass(frozen=True)
class TinkerPath:
    """A parsed ``tinker://<training_run_id>/<segment>/<name>``."""

    training_run_id: str
    segment: str  # weights | sampler_weights
    name: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.training_run_id}/{self.segment}/{self.name}"


def parse(path: str) -> TinkerPath:
    """Split a tinker path (InvalidRequest if it is not one EZTinker can hold)."""
    parts = path[len(SCHEME) :].split("/") if path.startswith(SCHEME) else []
    if len(parts) != 3 or parts[1] not in SEGMENTS or not parts[0]:
        raise InvalidRequest(
            f"{path!r} is not a tinker://<training_run_id>/(weights|sampler_weights)/<name> path",
            errors={"path": ["not a tinker path"]},
        )
    checkpoint_paths.validate_name(parts[2], "path")
    return TinkerPath(parts[0], parts[1], parts[2])


def run_id_of(training_run_id: str) -> str:
    """The EZTinker run a training run id names."""
    model = state.find_model(training_run_id)
    return model.run_id if model is not None else training_run_id


def training_run_id_of(run_id: str) -> str:
    return state.model_of_run(run_id) or run_id


def checkpoint_name(segment: str, name: str) -> str:
    """The EZTinker checkpoint name a save under ``segment`` writes."""
    return name + SAMPLER_SUFFIX if segment == "sampler_weights" else name


def to_checkpoint(path: str) -> CheckpointInfo:
    """The EZTinker checkpoint a tinker path names (NotFound, 404, if there is none)."""
    parsed = parse(path)
    run_id = run_id_of(parsed.training_run_id)
    try:
        checkpoint_paths.validate_name(run_id, "path")
    except InvalidRequest:
        raise NotFound(f"no checkpoint at {path!r}", errors={"path": ["not found"]}) from None
    kind = SEGMENTS[parsed.segment]
    names = [checkpoint_name(parsed.segment, parsed.name)]
    if kind == "sampler":
        names.append(parsed.name)
    for name in names:
        try:
            info = get_checkpoint(services().settings, checkpoint_paths.format_path(run_id, name))
        except NotFound:
            continue
        if info.kind == kind:
            return info
    raise NotFound(f"no checkpoint at {path!r}", errors={"path": ["not found"]})


def lora_of(info: CheckpointInfo) -> LoraSpec:
    """The LoRA shape a checkpoint was saved with (the default shape if it does not say)."""
    for meta_name in META_FILES:
        meta_path = Path(info.directory) / meta_name
        if meta_path.is_file():
            try:
                return LoraSpec.from_dict(json.loads(meta_path.read_text()).get("lora") or {})
            except (ValueError, TypeError):
                break
    return LoraSpec()


def from_checkpoint(info: CheckpointInfo) -> str:
    """The tinker path of an EZTinker checkpoint."""
    if info.kind == "sampler":
        name = info.name.removesuffix(SAMPLER_SUFFIX) or info.name
        return str(TinkerPath(training_run_id_of(info.run_id), "sampler_weights", name))
    return str(TinkerPath(training_run_id_of(info.run_id), "weights", info.name))
