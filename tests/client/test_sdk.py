"""The SDK against the real service: the Tinker-shaped flow, pipelining, asyncio, errors."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import eztinker
from eztinker import types
from eztinker.errors import BadRequestError, NotFoundError

TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on."
GREEDY = types.SamplingParams(max_tokens=8, temperature=0.0)


def sentence_datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": np.array(tokens[1:], dtype=np.int64),
            "weights": np.ones(len(tokens) - 1, dtype=np.float32),
        },
    )


def test_capabilities_and_tokenizer(sdk: eztinker.ServiceClient) -> None:
    caps = sdk.get_server_capabilities()
    names = [m.name for m in caps.supported_models]
    assert "tiny-gpt2" in names and caps.default_model in names
    tok = sdk.get_tokenizer("tiny-gpt2")
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert ids == sdk.tokenize(TEXT, "tiny-gpt2")
    assert tok.decode(ids) == TEXT == sdk.detokenize(ids, "tiny-gpt2")
    assert tok.eos_token_id == 0 and len(tok) == 2048
    # The dependency-free wrapper gives the same ids.
    from eztinker.tokenizer import Tokenizer, load_tokenizer

    light = load_tokenizer(sdk.transport, "tiny-gpt2", prefer_transformers=False)
    assert isinstance(light, Tokenizer)
    assert light.encode(TEXT) == ids and light.eos_token_id == 0 and light.vocab_size == 2048

    base = sdk.create_sampling_client(base_model="tiny-gpt2")
    out = base.sample("Once upon a time,", 1, types.SamplingParams(max_tokens=5, seed=1)).result()
    assert out.base_model == "tiny-gpt2" and out.prompt_tokens == tok.encode("Once upon a time,")
    assert 1 <= len(out.sequences[0].tokens) <= 5


def test_tinker_flow_train_sample_save_load(sdk: eztinker.ServiceClient) -> None:
    tc = sdk.create_lora_training_client("tiny-gpt2", rank=8, seed=0)
    tokens = tc.get_tokenizer().encode(TEXT)
    datum = sentence_datum(tokens)

    losses = []
    for step in range(1, 11):
        fb = tc.forward_backward([datum], "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=2e-2))
        out = fb.result()
        losses.append(out.metrics["loss:sum"])
        assert opt.result().metrics["step"] == step  # ty: ignore[not-subscriptable]
    assert losses[-1] < 0.7 * losses[0], losses
    logprobs = out.loss_fn_outputs[0]["logprobs"]
    assert len(logprobs.tolist()) == len(tokens) - 1
    assert np.isclose(-logprobs.to_numpy().sum(), losses[-1], rtol=1e-4)

    info = tc.get_info()
    assert (info.step, info.tokens_trained, info.base_model) == (
        10,
        10 * (len(tokens) - 1),
        "tiny-gpt2",
    )

    prompt = types.ModelInput.from_ints(tokens[:4])
    live = tc.create_sampling_client().sample(prompt, 2, GREEDY).result()
    assert len(live.sequences) == 2
    seq = live.sequences[0]
    assert 1 <= len(seq.tokens) <= 8 and len(seq.logprobs or []) == len(seq.tokens)
    assert seq.stop_reason in ("stop", "length") and isinstance(seq.text, str)

    saved = tc.save_state("flow-state").result()
    assert saved.path == f"{tc.run_id}/flow-state"
    assert saved.checkpoint is not None and saved.checkpoint.kind == "state"

    # A new run from the saved state samples exactly like the live run.
    tc2 = sdk.create_training_client_from_state(saved.path)
    assert tc2.run_id != tc.run_id and tc2.get_info().base_model == "tiny-gpt2"
    resumed = tc2.create_sampling_client().sample(prompt, 1, GREEDY).result()
    assert resumed.sequences[0].tokens == seq.tokens
    loaded = tc2.load_state_with_optimizer(saved.path).result()
    assert loaded.path == saved.path and loaded.step == 10
    assert tc2.forward_backward([datum]).result().metrics["loss:sum"] < losses[0]

    # Sampler weights: a checkpoint-backed SamplingClient agrees with the live weights.
    sc = tc.save_weights_and_get_sampling_client("flow-sampler")
    assert sc.model_path == f"{tc.run_id}/flow-sampler"
    assert sc.sample(prompt, 1, GREEDY).result().sequences[0].tokens == seq.tokens
    assert sc.get_base_model() == "tiny-gpt2"

    scored = sc.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    assert len(scored) == len(tokens) and scored[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in scored[1:])
    paths = {c.path for c in sdk.list_checkpoints(tc.run_id)}
    assert {saved.path, sc.model_path} <= paths


def test_pipelined_ops_run_in_order(sdk: eztinker.ServiceClient) -> None:
    tc = sdk.create_lora_training_client("tiny-gpt2", rank=4, seed=1)
    datum = sentence_datum(tc.get_tokenizer().encode(TEXT))
    pairs = [
        (tc.forward_backward([datum]), tc.optim_step(types.AdamParams(learning_rate=1e-2)))
        for _ in range(5)
    ]  # all ten submitted before waiting for any
    seqs = [f.seq_id for pair in pairs for f in pair]
    assert seqs == list(range(1, 11))
    steps = [opt.result().metrics["step"] for _, opt in pairs]  # ty: ignore[not-subscriptable]
    assert steps == [1, 2, 3, 4, 5]
    losses = [fb.result().metrics["loss:sum"] for fb, _ in pairs]
    assert len(set(losses)) == 5 and losses[-1] < losses[0], losses  # each saw a new step
    assert tc.get_info().step == 5


def test_asyncio_gather(sdk: eztinker.ServiceClient) -> None:
    async def main() -> tuple[list[types.ForwardBackwardOutput], types.OptimStepResponse, list]:
        tc = await sdk.create_lora_training_client_async("tiny-gpt2", rank=4, seed=2)
        tokens = tc.get_tokenizer().encode(TEXT)
        batches = [[sentence_datum(tokens[: 6 + i])] for i in range(3)]
        fb_futures = await asyncio.gather(*(tc.forward_backward_async(b) for b in batches))
        opt_future = await tc.optim_step_async(types.AdamParams(learning_rate=1e-2))
        fbs = await asyncio.gather(*fb_futures)
        opt = await opt_future
        sc = tc.create_sampling_client()
        sample_futures = await asyncio.gather(
            *(sc.sample_async(types.ModelInput.from_ints(tokens[:3]), 1, GREEDY) for _ in range(3))
        )
        samples = await asyncio.gather(*sample_futures)
        return list(fbs), opt, list(samples)

    fbs, opt, samples = asyncio.run(main())
    assert [len(f.loss_fn_outputs[0]["logprobs"]) for f in fbs] == [5, 6, 7]
    assert opt.metrics and opt.metrics["step"] == 1
    assert len({tuple(s.sequences[0].tokens) for s in samples}) == 1  # greedy: all equal


def test_user_errors_carry_category_and_message(sdk: eztinker.ServiceClient) -> None:
    tc = sdk.create_lora_training_client("tiny-gpt2", rank=4)
    bad = types.Datum(types.ModelInput.from_ints([1, 2, 5000]), {"target_tokens": [2, 3, 4]})
    with pytest.raises(BadRequestError) as info:
        tc.forward_backward([bad]).result()
    err = info.value
    assert err.category == "user" and err.status == 400
    assert "5000" in err.message and "vocabulary" in err.message
    missing = f"{tc.run_id}/no-such-checkpoint"
    with pytest.raises(NotFoundError) as not_found:
        tc.load_state(missing).result()
    assert not_found.value.category == "user" and missing in not_found.value.message
    # Whether the server rejects it at once or the operation fails, .result() raises it.
    with pytest.raises(NotFoundError) as failed:
        sdk.create_sampling_client(model_path=missing).sample([1, 2], 1, GREEDY).result()
    assert failed.value.category == "user" and missing in failed.value.message
    # The run still works after both.
    good = sentence_datum([5, 17, 42, 99, 7])
    assert tc.forward_backward([good]).result().metrics["loss:sum"] > 0


def test_unknown_run_is_a_404(sdk: eztinker.ServiceClient) -> None:
    with pytest.raises(NotFoundError) as info:
        sdk.get_run("run_does_not_exist")
    assert info.value.status == 404 and info.value.category == "user"
    tc = eztinker.TrainingClient(sdk.transport, "run_does_not_exist")
    with pytest.raises(NotFoundError, match="unknown run"):
        tc.optim_step()


def test_attach_to_an_existing_run_and_delete_it(sdk: eztinker.ServiceClient) -> None:
    tc = sdk.create_lora_training_client("tiny-gpt2", rank=4)
    tc.optim_step().result()
    attached = sdk.create_training_client(tc.run_id)
    first = attached.optim_step()
    second = attached.optim_step()
    assert (first.seq_id, second.seq_id) == (2, 3)  # numbered after the owner's op
    assert second.result().metrics and attached.get_info().step == 3
    assert sdk.delete_run(tc.run_id).result()["deleted"] is True
    assert tc.run_id not in {r.run_id for r in sdk.list_runs()}


def test_custom_loss_matches_cross_entropy(sdk: eztinker.ServiceClient) -> None:
    pytest.importorskip("torch")
    tc = sdk.create_lora_training_client("tiny-gpt2", rank=4, seed=3)
    datum = sentence_datum(tc.get_tokenizer().encode(TEXT))
    reference = tc.forward([datum]).result().metrics["loss:sum"]

    def nll(data: list[types.Datum], logprobs: list) -> tuple:
        loss = sum(-lp.sum() for lp in logprobs)
        return loss, {"tokens": float(sum(len(lp) for lp in logprobs))}

    out = tc.forward_backward_custom([datum], nll).result()
    assert abs(out.metrics["loss:sum"] - reference) < 1e-3 * reference
    assert out.metrics["tokens"] == len(datum.model_input.to_ints())
    tc.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    assert tc.forward([datum]).result().metrics["loss:sum"] < reference


def test_a_local_model_directory_trains_and_serves_its_tokenizer(
    sdk: eztinker.ServiceClient, service, tmp_path
) -> None:
    # A model named by its absolute path (what a user without hub access does): its tokenizer
    # files are fetched with the name in the query (a path segment cannot start with "/").
    import shutil

    from eztinker_tasks import catalog

    local = tmp_path / "my-model"
    shutil.copytree(catalog.model_dir("tiny-llama", service.data_dir), local)
    training = sdk.create_lora_training_client(str(local), rank=4, seed=0)
    tok = training.get_tokenizer()
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert ids == sdk.tokenize(TEXT, str(local)) and tok.decode(ids) == TEXT
    fb = training.forward_backward([sentence_datum(ids)], "cross_entropy").result()
    assert fb.metrics["loss:sum"] > 0
