"""The sample task's body: resolve the base model, tokenize, sample with progress, detokenize.

Kept beside ``tasks`` (which stays a list of thin task wrappers): the engine samples; this adds
what the HTTP result carries besides tokens (each sequence's text, the prompt tokens, the base
model) and publishes the decode progress under the sample's future.
"""

from __future__ import annotations

from typing import Any

from eztinker_tasks.errors import CheckpointNotFound, UnknownRun
from eztinker_tasks.runtime import WorkerRuntime
from eztinker_tasks.types import SampleSource, SamplingParams


def sample_body(
    rt: WorkerRuntime,
    future_id: str,
    source: SampleSource,
    prompt_tokens: list[int] | None,
    prompt_text: str | None,
    num_samples: int,
    params: SamplingParams,
    prompt_logprobs: bool,
) -> dict[str, Any]:
    base = base_model_of(rt, source)
    if prompt_tokens is None:
        # A hub or local model's tokenizer is written when this worker first loads the model:
        # describe it first (or fail with why it cannot be loaded), then tokenize.
        rt.engine.model_info(base)
        prompt_tokens = rt.tokenizers.encode(base, prompt_text or "")
    with rt.progress.track([future_id]) as report:
        out = rt.engine.sample(
            source, prompt_tokens, num_samples, params, prompt_logprobs, progress=report
        )
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
