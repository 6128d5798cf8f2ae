"""`POST /v1/sample` and `POST /v1/compute_logprobs`: answer 202 with a future at once.

Sampling a base model or a saved checkpoint goes to the shared sampling queue (any worker);
sampling a run's live weights goes to the run's own queue, behind its earlier operations.
"""

from __future__ import annotations

from eztinker_tasks import names
from eztinker_tasks.errors import InvalidRequest
from eztinker_tasks.limits import check_sampling_params
from eztinker_tasks.store import RunRecord
from eztinker_tasks.types import SampleSource
from eztinker_web import base_models, dispatch
from eztinker_web.blueprint import Blueprint
from eztinker_web.checkpoints.listing import get_checkpoint
from eztinker_web.runs.schemas import SubmittedSchema
from eztinker_web.sampling.schemas import (
    LOGPROBS_EXAMPLE,
    SAMPLE_EXAMPLE,
    ComputeLogprobsSchema,
    LogprobsRequest,
    SampleRequest,
    SampleSchema,
)
from eztinker_web.services import services

blp = Blueprint("sampling", __name__, url_prefix="/v1", description="Sampling and logprobs")


def _resolve(source: SampleSource) -> tuple[SampleSource, RunRecord | None, str | None]:
    """Fill the default model; find the run; return the base model name when known."""
    if source.run_id:
        run = dispatch.usable_run(source.run_id)
        return source, run, run.base_model or None
    if source.checkpoint:
        # 404 now rather than a failed future; its base model checks the prompt's tokens.
        info = get_checkpoint(services().settings, source.checkpoint)
        if info.base_model:
            base_models.check_model_name(info.base_model)
        return source, None, info.base_model or None
    base = source.base_model or services().settings.default_model
    base_models.check_model_name(base)
    return SampleSource(base_model=base), None, base


@blp.route("/sample", methods=["POST"])
@blp.arguments(SampleSchema(), example=SAMPLE_EXAMPLE)
@blp.response(202, SubmittedSchema)
@blp.errors(400, 404, 409)
def sample(req: SampleRequest):
    """Sample `num_samples` continuations of a prompt (text or tokens)."""
    return submit_sample(req).to_dict()


def submit_sample(req: SampleRequest, stream: bool = False) -> dispatch.Submitted:
    """Check a sample request and queue it (also used by ``/api/v1/asample`` and the
    OpenAI-compatible routes). ``stream``: the worker publishes its tokens as they are sampled
    (``eztinker_tasks.token_stream``)."""
    settings = services().settings
    check_sampling_params(req.params)
    if req.num_samples > settings.max_samples:
        raise InvalidRequest(
            f"num_samples {req.num_samples} is over the limit of {settings.max_samples}",
            errors={"num_samples": ["too many"]},
        )
    if req.params.max_tokens > settings.max_sample_tokens:
        raise InvalidRequest(
            f"max_tokens {req.params.max_tokens} is over the limit of {settings.max_sample_tokens}",
            errors={"max_tokens": ["too many"]},
        )
    source, run, base = _resolve(req.source)
    if base and req.prompt_tokens is not None:
        dispatch.check_tokens(base, [req.prompt_tokens], "prompt_tokens", req.params.max_tokens)
    stop_ids = [t for t in req.params.stop or () if isinstance(t, int)]
    if base and stop_ids:
        dispatch.check_tokens(base, [stop_ids], "stop")
    params = {
        "source": source.to_dict(),
        "num_samples": req.num_samples,
        "params": req.params.to_dict(),
        "prompt_tokens": list(req.prompt_tokens) if req.prompt_tokens is not None else None,
        "prompt_text": req.prompt_text,
        "prompt_logprobs": req.prompt_logprobs,
    }
    if stream:
        params["stream"] = True
    return dispatch.submit_shared(names.SAMPLE, params, run)


@blp.route("/compute_logprobs", methods=["POST"])
@blp.arguments(ComputeLogprobsSchema(), example=LOGPROBS_EXAMPLE)
@blp.response(202, SubmittedSchema)
@blp.errors(400, 404, 409)
def compute_logprobs(req: LogprobsRequest):
    """One logprob per token of `tokens` (None at position 0)."""
    source, run, base = _resolve(req.source)
    if base:
        dispatch.check_tokens(base, [req.tokens], "tokens")
    params = {"source": source.to_dict(), "tokens": list(req.tokens)}
    return dispatch.submit_shared(names.COMPUTE_LOGPROBS, params, run).to_dict()
