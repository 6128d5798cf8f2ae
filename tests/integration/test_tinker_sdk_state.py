"""The official ``tinker`` SDK: checkpoints, resume, sampling and RestClient listings.

``tinker://`` paths map onto EZTinker checkpoints both ways, so ``/v1`` reads what the SDK
saved and gets the same numbers. Every SDK call is bounded (see ``test_tinker_sdk``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import tinker
from tinker import types

from tests.conftest import Service, result_of
from tests.integration.test_tinker_sdk import ADAM, TOKENS, _bounded, _datum


@pytest.fixture()
def client(service: Service, monkeypatch: pytest.MonkeyPatch) -> Iterator[tinker.ServiceClient]:
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    with tinker.ServiceClient(base_url=service.base_url, api_key="tml-dummy") as sc:
        yield sc


def _step(tc: Any) -> float:
    out = _bounded(lambda: tc.forward_backward([_datum()], "cross_entropy").result())
    _bounded(lambda: tc.optim_step(types.AdamParams(**ADAM)).result())
    return out.metrics["loss:sum"]


def _forward_loss(tc: Any) -> float:
    return _bounded(lambda: tc.forward([_datum()], "cross_entropy").result()).metrics["loss:sum"]


def _v1_checkpoint(http: httpx.Client, tinker_path: str) -> str:
    """The EZTinker path of a tinker path (its name is unique in the test session)."""
    segment, name = tinker_path.split("/")[-2:]
    kind = "sampler" if segment == "sampler_weights" else "state"
    for ckpt in http.get("/v1/checkpoints").json()["checkpoints"]:
        if ckpt["kind"] == kind and ckpt["name"].removesuffix(".sampler") == name:
            return ckpt["path"]
    raise AssertionError(f"/v1 lists no checkpoint for {tinker_path}")


def test_save_resume_sample_and_list(
    client: tinker.ServiceClient, service: Service, http: httpx.Client
) -> None:
    tc = _bounded(
        lambda: client.create_lora_training_client(base_model="tiny-gpt2", rank=4, seed=3).result()
    )
    _step(tc)
    name = f"s-{uuid.uuid4().hex[:8]}"
    state_path = _bounded(lambda: tc.save_state(name).result()).path
    sampler_path = _bounded(lambda: tc.save_weights_for_sampler(name).result()).path
    assert state_path == f"tinker://{tc.model_id}/weights/{name}"
    assert sampler_path == f"tinker://{tc.model_id}/sampler_weights/{name}"

    # Exact resume: the same step from the saved state gives the same weights.
    _step(tc)
    expected = _forward_loss(tc)
    resumed = _bounded(
        lambda: client.create_training_client_from_state_with_optimizer(state_path).result()
    )
    assert resumed.model_id != tc.model_id and ":train:" in resumed.model_id
    _step(resumed)
    assert _forward_loss(resumed) == pytest.approx(expected, abs=1e-5)

    # Sampling from the saved sampler weights equals /v1 sampling of the same checkpoint.
    sc = _bounded(lambda: client.create_sampling_client(model_path=sampler_path).result())
    prompt = types.ModelInput.from_ints(TOKENS)
    lps = _bounded(lambda: sc.compute_logprobs(prompt).result())
    checkpoint = _v1_checkpoint(http, sampler_path)
    v1_lps = result_of(
        http, http.post("/v1/compute_logprobs", json={"checkpoint": checkpoint, "tokens": TOKENS})
    )["logprobs"]
    assert lps[0] is None and v1_lps[0] is None
    assert lps[1:] == pytest.approx(v1_lps[1:], abs=1e-5)

    params = types.SamplingParams(max_tokens=6, seed=7, temperature=1.0, stop=["\n"])
    out = _bounded(lambda: sc.sample(prompt, 3, params, include_prompt_logprobs=True).result())
    assert len(out.sequences) == 3
    assert all(s.sequence_id for s in out.sequences)
    assert len({s.sequence_id for s in out.sequences}) == 3
    for seq in out.sequences:
        assert seq.logprobs is not None and len(seq.logprobs) == len(seq.tokens)
        assert seq.stop_reason in ("stop", "length")
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    assert out.prompt_logprobs[1:] == pytest.approx(v1_lps[1:], abs=1e-5)
    v1_out = result_of(
        http,
        http.post(
            "/v1/sample",
            json={
                "checkpoint": checkpoint,
                "prompt_tokens": TOKENS,
                "num_samples": 3,
                "max_tokens": 6,
                "seed": 7,
                "stop": ["\n"],
            },
        ),
    )
    assert [list(s.tokens) for s in out.sequences] == [s["tokens"] for s in v1_out["sequences"]]

    # A snapshot of the live weights, sampled at once.
    live = _bounded(lambda: tc.save_weights_and_get_sampling_client().result())
    more = _bounded(lambda: live.sample(prompt, 2, types.SamplingParams(max_tokens=3)).result())
    assert len(more.sequences) == 2

    # RestClient listings.
    rest = tinker.RestClient(base_url=service.base_url, api_key="tml-dummy")
    runs = _bounded(lambda: rest.list_training_runs(limit=100).result())
    assert tc.model_id in {r.training_run_id for r in runs.training_runs}
    assert runs.cursor.total_count >= 2
    ckpts = _bounded(lambda: rest.list_checkpoints(tc.model_id).result()).checkpoints
    assert {f"weights/{name}", f"sampler_weights/{name}"} <= {c.checkpoint_id for c in ckpts}
    run = _bounded(lambda: rest.get_training_run_by_tinker_path(state_path).result())
    assert run.training_run_id == tc.model_id and run.base_model == "tiny-gpt2"
    assert run.lora_rank == 4
    info = _bounded(lambda: rest.get_weights_info_by_tinker_path(state_path).result())
    assert info.base_model == "tiny-gpt2" and info.lora_rank == 4


def test_unknown_paths_raise_clearly(client: tinker.ServiceClient) -> None:
    missing = "tinker://ses_nope:train:0/weights/none"
    with pytest.raises(tinker.TinkerError, match="no checkpoint"):
        _bounded(lambda: client.create_training_client_from_state(missing).result())
    with pytest.raises(tinker.TinkerError, match="no checkpoint"):
        _bounded(lambda: client.create_sampling_client(model_path=missing).result())


def test_base_model_sampling(client: tinker.ServiceClient, http: httpx.Client) -> None:
    """A base model's session: logprobs equal /v1's, ``prompt_logprobs_last_n``, ``stop=[]``."""
    sc = _bounded(lambda: client.create_sampling_client(base_model="tiny-llama").result())
    assert sc.get_base_model() == "tiny-llama"
    prompt = types.ModelInput.from_ints(TOKENS)
    lps = _bounded(lambda: sc.compute_logprobs(prompt).result())
    body = {"base_model": "tiny-llama", "tokens": TOKENS}
    v1 = result_of(http, http.post("/v1/compute_logprobs", json=body))["logprobs"]
    assert lps[1:] == pytest.approx(v1[1:], abs=1e-5)
    last = _bounded(lambda: sc.compute_logprobs(prompt, prompt_logprobs_last_n=3).result())
    assert last[:-3] == [None] * (len(TOKENS) - 3)
    assert last[-3:] == pytest.approx(v1[-3:], abs=1e-5)
    # stop=[]: not even EOS stops it, so every sample runs to max_tokens.
    params = types.SamplingParams(max_tokens=5, seed=1, stop=[])
    out = _bounded(lambda: sc.sample(prompt, 2, params).result())
    assert [len(s.tokens) for s in out.sequences] == [5, 5]
    assert all(s.stop_reason == "length" for s in out.sequences)


def test_sampler_snapshots_keep_only_the_newest(
    client: tinker.ServiceClient, service: Service
) -> None:
    """An RL loop makes one ``save_weights_and_get_sampling_client`` snapshot per step: only
    the newest EZTINKER_SAMPLER_SNAPSHOTS_KEPT (8) stay on disk; an old client says why it
    cannot sample; named sampler weights are never pruned."""
    tc = _bounded(
        lambda: client.create_lora_training_client(base_model="tiny-gpt2", rank=4, seed=5).result()
    )
    named = _bounded(lambda: tc.save_weights_for_sampler("kept-by-name").result())
    clients = []
    for _ in range(11):
        _step(tc)
        clients.append(_bounded(lambda: tc.save_weights_and_get_sampling_client().result()))
    run_dirs = [p for p in service.checkpoints_dir.iterdir() if p.is_dir()]
    owner = next(d for d in run_dirs if (d / "kept-by-name.sampler").is_dir())
    snaps = sorted(p.name for p in owner.iterdir() if p.name.startswith("snapshot-"))
    assert len(snaps) == 8, snaps
    prompt = types.ModelInput.from_ints(TOKENS[:4])
    params = types.SamplingParams(max_tokens=3, seed=1)
    newest = _bounded(lambda: clients[-1].sample(prompt, 1, params).result())
    assert len(newest.sequences[0].tokens) == 3
    with pytest.raises(tinker.TinkerError, match="EZTINKER_SAMPLER_SNAPSHOTS_KEPT"):
        _bounded(lambda: clients[0].sample(prompt, 1, params).result())
    from_named = _bounded(lambda: client.create_sampling_client(model_path=named.path).result())
    assert len(_bounded(lambda: from_named.sample(prompt, 1, params).result()).sequences) == 1
