"""Runs and their training operations.

`POST /v1/runs` binds a new run's queue to one worker; every operation below answers 202 with
a future at once and is executed, in submission order, by that worker. A run whose worker is
gone is shown `lost`; `load` moves it to a live worker and rebuilds it there. A run is its
creator's tenant's: lists show the caller's runs, and another tenant's run answers 404.
"""

from __future__ import annotations

from dataclasses import asdict, replace

from eztinker_tasks import checkpoint_paths, names
from eztinker_tasks.errors import InvalidRequest
from eztinker_tasks.limits import check_adam_params, check_lora_spec
from eztinker_tasks.loss_specs import check_loss_inputs, get_loss_spec, resolve_loss_config
from eztinker_web import base_models, dispatch, tenancy
from eztinker_web.blueprint import Blueprint
from eztinker_web.checkpoints.listing import loadable_checkpoint
from eztinker_web.runs.schemas import (
    CREATE_RUN_EXAMPLE,
    FORWARD_EXAMPLE,
    OPTIM_STEP_EXAMPLE,
    SAVE_EXAMPLE,
    CreatedRunSchema,
    CreateRunRequest,
    CreateRunSchema,
    ForwardBackwardSchema,
    ForwardRequest,
    LoadRequest,
    LoadSchema,
    OptimStepRequest,
    OptimStepSchema,
    RunListSchema,
    RunSchema,
    SaveRequest,
    SaveSchema,
    SubmittedSchema,
)
from eztinker_web.runs.views import run_views
from eztinker_web.services import services

blp = Blueprint("runs", __name__, url_prefix="/v1/runs", description="Training runs")


@blp.route("", methods=["POST"])  # no body: every field has its default
@blp.arguments(CreateRunSchema(), required=False, example=CREATE_RUN_EXAMPLE)
@blp.response(201, CreatedRunSchema)
@blp.errors(400, 404)
def create_run(req: CreateRunRequest):
    """Create a LoRA training run on a base model (or from a saved state)."""
    settings = services().settings
    check_lora_spec(req.lora)
    if req.from_state:
        base = loadable_checkpoint(settings, req.from_state, req.optimizer).base_model
    else:
        base = req.base_model or settings.default_model
    if base:  # "" only from a checkpoint whose metadata names none: the worker judges it
        base_models.check_model_name(base)
    record, submitted = dispatch.create_run(base, req.lora.to_dict(), req.from_state, req.optimizer)
    # As GET shows it: a new run has no checkpoints yet, and its creation is op 0.
    return {**asdict(record), "checkpoints": [], "last_seq_id": 0, **submitted.to_dict()}


@blp.route("", methods=["GET"])
@blp.response(200, RunListSchema)
def list_runs():
    """Every run of the caller's tenant that was not deleted, shown as `GET /v1/runs/<run_id>`
    shows each (every tenant's for an admin key)."""
    return {"runs": run_views(tenancy.seen_runs(services().store.list_runs()))}


@blp.route("/<run_id>", methods=["GET"])
@blp.response(200, RunSchema)
@blp.errors(404)
def get_run(run_id: str):
    """A run's status (`lost` with the reason when its worker is gone), worker, step, tokens
    trained, last loss and checkpoints."""
    return run_views([dispatch.live_run(run_id)], one=True)[0]


@blp.route("/<run_id>", methods=["DELETE"])
@blp.response(202, SubmittedSchema)
@blp.errors(404)
def delete_run(run_id: str):
    """Delete a run: after its queued operations, free its adapter and unbind its queue.

    Checkpoints stay on disk. A run whose worker is gone is deleted by any live worker.
    """
    record = dispatch.live_run(run_id)
    if dispatch.worker_alive(record.worker):
        submitted = dispatch.submit_shared(
            names.DELETE_RUN, {"run_id": run_id}, record, counted=False
        )
    else:  # nothing to free: its state went with its worker
        shared = dispatch.submit_shared(names.DELETE_RUN, {"run_id": run_id}, counted=False)
        submitted = replace(shared, run_id=run_id)
    services().store.update_run(run_id, status="deleted")
    services().run_targets.drop(run_id)
    return submitted.to_dict()


def check_forward(run_id: str, req: ForwardRequest):
    """The run's target and the op's params, after every check a forward(_backward) gets
    (also used by ``/api/v1``)."""
    settings = services().settings
    target = dispatch.run_target(run_id)
    if len(req.data) > settings.max_datums:
        raise InvalidRequest(
            f"{len(req.data)} datums is over the limit of {settings.max_datums}",
            errors={"data": ["too many datums"]},
        )
    spec = get_loss_spec(req.loss_fn)
    config = resolve_loss_config(spec, req.loss_fn_config)
    for i, datum in enumerate(req.data):
        try:
            check_loss_inputs(spec, set(datum.loss_fn_inputs))
        except InvalidRequest as exc:
            exc.message = f"data[{i}]: {exc.message}"
            raise
    if target.base_model:
        dispatch.check_tokens(target.base_model, [d.tokens for d in req.data], "data")
        dispatch.check_tokens(
            target.base_model,
            [[int(t) for t in d.loss_fn_inputs["target_tokens"]] for d in req.data],
            "target_tokens",
        )
    params = {
        "data": [d.to_dict() for d in req.data],
        "loss_fn": req.loss_fn,
        "loss_fn_config": config,
    }
    return target, params


@blp.route("/<run_id>/forward_backward", methods=["POST"])
@blp.arguments(ForwardBackwardSchema(), example=FORWARD_EXAMPLE)
@blp.response(202, SubmittedSchema)
@blp.errors(400, 404, 409)
def forward_backward(req: ForwardRequest, run_id: str):
    """Forward + backward on a batch; gradients accumulate until optim_step."""
    target, params = check_forward(run_id, req)
    return dispatch.submit_run_op(target, names.FORWARD_BACKWARD, params, req.seq_id).to_dict()


@blp.route("/<run_id>/forward", methods=["POST"])
@blp.arguments(ForwardBackwardSchema(), example=FORWARD_EXAMPLE)
@blp.response(202, SubmittedSchema)
@blp.errors(400, 404, 409)
def forward(req: ForwardRequest, run_id: str):
    """The same outputs as forward_backward, with no gradient and no state change."""
    target, params = check_forward(run_id, req)
    return dispatch.submit_run_op(target, names.FORWARD, params, req.seq_id).to_dict()


@blp.route("/<run_id>/optim_step", methods=["POST"])  # no body: every field has its default
@blp.arguments(OptimStepSchema(), required=False, example=OPTIM_STEP_EXAMPLE)
@blp.response(202, SubmittedSchema)
@blp.errors(400, 404, 409)
def optim_step(req: OptimStepRequest, run_id: str):
    """One AdamW step on the accumulated gradients, which are then zeroed."""
    check_adam_params(req.adam)
    target = dispatch.run_target(run_id)
    params = {"adam": req.adam.to_dict()}
    return dispatch.submit_run_op(target, names.OPTIM_STEP, params, req.seq_id).to_dict()


@blp.route("/<run_id>/save", methods=["POST"])
@blp.arguments(SaveSchema(), example=SAVE_EXAMPLE)
@blp.response(202, SubmittedSchema)
@blp.errors(400, 404, 409)
def save(req: SaveRequest, run_id: str):
    """Save a checkpoint: `state` (adapter + optimizer, to resume) or `sampler` (PEFT)."""
    target = dispatch.run_target(run_id)
    checkpoint_paths.validate_name(req.name)
    params = {"name": req.name, "kind": req.kind}
    return dispatch.submit_run_op(target, names.SAVE, params, req.seq_id).to_dict()


@blp.route("/<run_id>/load", methods=["POST"])
@blp.arguments(LoadSchema())
@blp.response(202, SubmittedSchema)
@blp.errors(400, 404, 409)
def load(req: LoadRequest, run_id: str):
    """Load a saved state into this run (with or without its optimizer state).

    A run whose worker is gone (shown `lost`) moves to a live worker first and is rebuilt
    there from the state.
    """
    # 404 / 400 now rather than a failed future
    info = loadable_checkpoint(services().settings, req.path, req.optimizer)
    if info.base_model:
        base_models.check_model_name(info.base_model)
    dispatch.rehome(run_id)
    target = dispatch.run_target(run_id)
    params = {"path": req.path, "optimizer": req.optimizer}
    return dispatch.submit_run_op(target, names.LOAD, params, req.seq_id).to_dict()
