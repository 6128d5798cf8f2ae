"""What an OpenAI ``model`` names, and ``GET /openai/v1/models``.

- a base model: ``tiny-gpt2``, a hub id (``Qwen/Qwen2.5-0.5B``), a local directory, ``shaped:``;
- ``run:<run_id>``: that run's live weights, as they are when the request reaches the front of
  the run's queue (every operation submitted before it applied, none after);
- ``<run_id>/<name>``: a saved checkpoint (state or sampler);
- ``tinker://<training_run_id>/(weights|sampler_weights)/<name>``: the same checkpoint under
  Tinker's name.

A name with a slash is a checkpoint when one exists at that path, else a base model (hub ids
have slashes too). Tenancy is ``/v1``'s: another tenant's run or checkpoint is not found, and
the list shows only the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eztinker_tasks import catalog, checkpoint_paths
from eztinker_tasks.errors import InvalidRequest, NotFound
from eztinker_tasks.types import SampleSource
from eztinker_web import base_models, dispatch, tenancy
from eztinker_web.checkpoints.listing import get_checkpoint, list_checkpoints
from eztinker_web.services import services
from eztinker_web.tinker_api import paths

RUN_PREFIX = "run:"


@dataclass(frozen=True)
class Target:
    """A resolved model name: the sample source, and its base model when known."""

    source: SampleSource
    base_model: str | None


def _not_found(model: str, why: str) -> NotFound:
    return NotFound(f"the model {model!r} does not exist: {why}", errors={"model": ["not found"]})


def resolve(model: str) -> Target:
    """The sample source ``model`` names. NotFound (404) if there is none (or the caller does
    not see it), InvalidRequest (400) if it is not a model name at all."""
    if model.startswith(RUN_PREFIX):
        run_id = model[len(RUN_PREFIX) :]
        try:
            checkpoint_paths.validate_name(run_id, "model")
            run = dispatch.usable_run(run_id)
        except (NotFound, InvalidRequest):
            raise _not_found(model, "no such run") from None
        return Target(SampleSource(run_id=run_id), run.base_model or None)
    if model.startswith(paths.SCHEME):
        try:
            info = paths.to_checkpoint(model)
        except (NotFound, InvalidRequest):
            raise _not_found(model, "no checkpoint at this tinker path") from None
        return Target(SampleSource(checkpoint=info.path), info.base_model or None)
    if "/" in model:
        try:
            info = get_checkpoint(services().settings, model)
            return Target(SampleSource(checkpoint=info.path), info.base_model or None)
        except (NotFound, InvalidRequest):
            pass  # not a checkpoint path: a hub id perhaps
    try:
        base_models.check_model_name(model)
    except NotFound:
        raise
    except InvalidRequest:
        raise _not_found(
            model, "not a base model, run:<run_id>, checkpoint or tinker path"
        ) from None
    return Target(SampleSource(base_model=model), model)


def _entry(model_id: str, created: float, owned_by: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": int(created),
        "owned_by": owned_by,
        **extra,
    }


def list_models() -> list[dict[str, Any]]:
    """Base models, the caller's live runs and their checkpoints (OpenAI's model objects,
    with ``base_model`` added)."""
    svc = services()
    seen = tenancy.seen_model_names()
    out = [
        _entry(s.name, 0, "eztinker", base_model=s.name) for s in catalog.BUILTIN_MODELS.values()
    ]
    names = {s.name for s in catalog.BUILTIN_MODELS.values()}
    for info in svc.store.list_models():
        name = info.get("name")
        if name and name not in names and (seen is None or name in seen):
            names.add(name)
            out.append(_entry(name, 0, "eztinker", base_model=name))
    runs = [
        r for r in tenancy.seen_runs(svc.store.list_runs()) if r.status not in ("deleted", "failed")
    ]
    for run in runs:
        out.append(
            _entry(RUN_PREFIX + run.run_id, run.created_at, run.tenant, base_model=run.base_model)
        )
    for ckpt in tenancy.seen_checkpoints(list_checkpoints(svc.settings)):
        out.append(_entry(ckpt.path, ckpt.created_at, "eztinker", base_model=ckpt.base_model))
        out.append(
            _entry(
                paths.from_checkpoint(ckpt), ckpt.created_at, "eztinker", base_model=ckpt.base_model
            )
        )
    return out
