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
    """The lead request's result; every request of its batch (the lead too) is answered under
    its own future as soon as it ends, so none waits for the others.

    Raises the lead's own ``EZTinkerError``. Should the batch itself fail, every request not
    yet answered fails with it; an answer that could not be stored when its request ended is
    stored again at the end: nothing claimed is left hanging.
    """

    def on_answer(i: int, outcome: Any) -> None:
        sample_batch.store_answers(rt, backend, [(batch.requests[i], outcome)])
        if i == 0:
            backend.answered_early(lead.task_id)  # Celery's own store would write it again

    batch = sample_batch.Batch(rt, lead, on_answer)
    failure: BaseException | None = None
    try:
        batch.run()
    except BaseException as exc:
        failure = exc
    finally:
        late = [(batch.requests[i], batch.outcomes[i]) for i in batch.unanswered]
        if failure is not None:
            late += [
                (request, failure)
                for i, request in enumerate(batch.requests)
                if i > 0 and i not in batch.outcomes
            ]
        _store_late(rt, backend, late)
    if len(batch.requests) > 1:
        more = len(batch.requests) - 1
        log.info("sampled %d more requests in the batch of %s", more, lead.task_id)
    lead_out = batch.outcomes.get(0)
    if lead_out is None:
        assert failure is not None
        raise failure
    if failure is not None:
        log.error("the sample batch of %s failed after its lead ended", lead.task_id)
    if isinstance(lead_out, EZTinkerError):
        raise lead_out
    return lead_out


def _store_late(rt: WorkerRuntime, backend: ResultBackend, answers: list) -> None:
    """Store answers that could not be stored when their requests ended (a few tries)."""
    for attempt in range(5):
        if not answers:
            return
        try:
            sample_batch.store_answers(rt, backend, answers)
            return
        except Exception:
            log.warning("storing %d sample answers failed (try %d)", len(answers), attempt + 1)
            time.sleep(0.5 * (attempt + 1))
    log.error("%d sample answers could not be stored", len(answers))


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
    """The base model of a sample's source (``sample_batch.base_of``; for a checkpoint whose
    run is not known, from the checkpoint itself).

    Raises ``UnknownRun`` or ``CheckpointNotFound``.
    """
    base = sample_batch.base_of(rt, source)
    if base is not None:
        return base
    if source.run_id:
        raise UnknownRun(f"unknown run {source.run_id!r}")
    assert source.checkpoint is not None
    infos = [c for c in rt.engine.list_checkpoints() if c.path == source.checkpoint]
    if not infos:
        raise CheckpointNotFound(f"no checkpoint {source.checkpoint!r}")
    return infos[0].base_model
