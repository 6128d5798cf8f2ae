"""What ``/api/v1`` remembers beyond ``/v1``'s records, in Redis: sessions, model ids, requests.

- a session: its tenant;
- a Tinker model id (``{session_id}:train:{n}``) -> the EZTinker run it is, and its create future;
- a request id (an EZTinker future id) -> how its result is shown on Tinker's wire (``kind``).

Every record expires after a week; the runs and futures themselves live in ``/v1``'s store.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from eztinker_tasks.errors import NotFound
from eztinker_web.auth import caller
from eztinker_web.services import services

P = "ezt:tinker"
TTL_S = 7 * 24 * 3600


@dataclass(frozen=True)
class TinkerModel:
    """A Tinker training client's model: the run behind it and its create future."""

    model_id: str
    run_id: str
    base_model: str
    lora_rank: int
    create_future: str
    tenant: str


@dataclass(frozen=True)
class TinkerRequest:
    """How to answer ``retrieve_future`` for one request: its ``kind``, model id, and for a
    save for a sampling session, that session; for a sample, ``prompt_logprobs_last_n``."""

    kind: str  # create_model | forward_backward | optim_step | save_weights | ... | sample
    model_id: str | None = None
    sampler_id: str | None = None
    last_n: int | None = None


@dataclass(frozen=True)
class Sampler:
    """A sampling session: a base model, or a checkpoint (EZTinker path and Tinker path)."""

    sampler_id: str
    base_model: str
    checkpoint: str | None
    model_path: str | None
    tenant: str


def put_sampler(sampler: Sampler) -> None:
    services().redis_client.set(
        f"{P}:sampler:{sampler.sampler_id}", json.dumps(asdict(sampler)), ex=TTL_S
    )


def get_sampler(sampler_id: str) -> Sampler:
    """The sampling session, or NotFound (404) if unknown or another tenant's."""
    raw = services().redis_client.get(f"{P}:sampler:{sampler_id}")
    sampler = Sampler(**json.loads(raw)) if raw else None
    if sampler is None or not caller().sees(sampler.tenant):
        raise NotFound(
            f"unknown sampling session {sampler_id!r}", errors={"sampling_session_id": []}
        )
    return sampler


def model_id_of(session_id: str, model_seq_id: int) -> str:
    """The official id shape, which the SDK also computes itself for create-via-load."""
    return f"{session_id}:train:{model_seq_id}"


def put_session(session_id: str) -> None:
    services().redis_client.set(f"{P}:session:{session_id}", caller().tenant, ex=TTL_S)


def claim_model(model: TinkerModel) -> TinkerModel | None:
    """Record ``model`` unless its id exists; the existing one (a retried create) if it does."""
    key = f"{P}:model:{model.model_id}"
    client = services().redis_client
    if client.set(key, json.dumps(asdict(model)), nx=True, ex=TTL_S):
        return None
    raw = client.get(key)
    return TinkerModel(**json.loads(raw)) if raw else None


def update_model(model: TinkerModel) -> None:
    """Record ``model`` and the way back from its run to its model id."""
    pipe = services().redis_client.pipeline(transaction=False)
    pipe.set(f"{P}:model:{model.model_id}", json.dumps(asdict(model)), ex=TTL_S)
    if model.run_id:
        pipe.set(f"{P}:run:{model.run_id}", model.model_id, ex=TTL_S)
    pipe.execute()


def model_of_run(run_id: str) -> str | None:
    """The Tinker model id of a run made through ``/api/v1`` (None for a ``/v1`` run)."""
    raw = services().redis_client.get(f"{P}:run:{run_id}")
    return raw.decode() if isinstance(raw, bytes) else raw


def find_model(model_id: str) -> TinkerModel | None:
    """The model if it exists and the caller sees it."""
    raw = services().redis_client.get(f"{P}:model:{model_id}")
    model = TinkerModel(**json.loads(raw)) if raw else None
    return model if model is not None and caller().sees(model.tenant) else None


def drop_model(model_id: str) -> None:
    services().redis_client.delete(f"{P}:model:{model_id}")


def get_model(model_id: str) -> TinkerModel:
    """The model, or NotFound (404) if unknown or another tenant's."""
    model = find_model(model_id)
    if model is None:
        raise NotFound(f"unknown model {model_id!r}", errors={"model_id": ["not found"]})
    return model


def put_request(future_id: str, request: TinkerRequest) -> None:
    services().redis_client.set(f"{P}:req:{future_id}", json.dumps(asdict(request)), ex=TTL_S)


def get_request(future_id: str) -> TinkerRequest | None:
    raw = services().redis_client.get(f"{P}:req:{future_id}")
    return TinkerRequest(**json.loads(raw)) if raw else None


def sample_key(sampler_id: str, seq_id: int) -> str:
    return f"{P}:sample:{sampler_id}:{seq_id}"


def resubmitted_sample(key: str, digest: str) -> tuple[str, int] | None:
    """The (future id, num_samples) a sample with this key and body was already given."""
    raw = services().redis_client.get(key)
    if not raw:
        return None
    seen = json.loads(raw)
    return (seen["future_id"], seen["num_samples"]) if seen["digest"] == digest else None


def remember_sample(key: str, digest: str, future_id: str, num_samples: int) -> None:
    value = {"digest": digest, "future_id": future_id, "num_samples": num_samples}
    services().redis_client.set(key, json.dumps(value), ex=TTL_S)
