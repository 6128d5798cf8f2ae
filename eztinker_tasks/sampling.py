"""The sample task's body: resolve the base model, tokenize, sample with progress, detokenize.

Kept beside ``tasks`` (which stays a list of thin task wrappers): the engine samples; this adds
what the HTTP result carries besides tokens (each sequence's text, the prompt tokens, the base
model) and publishes the decode progress under the sample's future. The samples waiting behind
the starting one in its queue run in the same decode batch (``sample_batch``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from eztinker_tasks import sample_batch
from eztinker_tasks.errors import CheckpointNotFound, EZTinkerError, UnknownRun
from eztinker_tasks.result_backend import ResultBackend
from eztinker_tasks.runtime import WorkerRuntime
from eztinker_tasks.types import SampleOutput, SampleSource

log = logging.getLogger(__name__)


def sample_body(
    rt: WorkerRuntime, backend: ResultBackend, lead: sample_batch.SampleRequest
) -> dict[str, Any]:
    """The lead request's result; the requests it gathered are answered under their futures.

    Raises the lead's own ``EZTinkerError`` (after the others are answered).
    """
    others = sample_batch.gather(rt, lead, time.time())
    try:
        outcomes = sample_batch.run_batch(rt, [lead, *others])
    except BaseException as exc:  # nothing claimed may hang: fail them with the batch
        sample_batch.store_answers(rt, backend, [(o, exc) for o in others])
        raise
    sample_batch.store_answers(rt, backend, list(zip(others, outcomes[1:], strict=True)))
    if others:
        log.info("sampled %d waiting requests in the batch of %s", len(others), lead.task_id)
    if isinstance(outcomes[0], EZTinkerError):
        raise outcomes[0]
    return outcomes[0]


def result_of(
    rt: WorkerRuntime, base: str, prompt_tokens: list[int], out: SampleOutput
) -> dict[str, Any]:
    """The HTTP result of a sample: the engine's output plus texts, prompt tokens, base."""
    result = out.to_dict()
    for seq in result["sequences"]:
        seq["text"] = rt.tokenizers.decode(base, seq["tokens"])  # without EOS etc.
    result["prompt_tokens"] = list(prompt_tokens)
    result["base_model"] = base
    return result


def base_model_of(rt: WorkerRuntime, source: SampleSource) -> str:
    if source.base_model:
        return source.base_model
    if source.run_id:
        if rt.engine.has_run(source.run_id):
            return rt.engine.run_info(source.run_id).base_model
        record = rt.store.get_run(source.run_id)
        if record is None:
            raise UnknownRun(f"unknown run {source.run_id!r}")
        return record.base_model
    assert source.checkpoint is not None
    infos = [c for c in rt.engine.list_checkpoints() if c.path == source.checkpoint]
    if not infos:
        raise CheckpointNotFound(f"no checkpoint {source.checkpoint!r}")
    return infos[0].base_model
