"""Sampler / learner parity: the logprobs that sampling returns are the learner's.

At temperature 1 with no top-k / top-p, each sampled token's logprob must equal the logprob
that ``TrainingClient.forward`` computes for the same token after the same prefix, under the
same weights: the base model, a run's live weights after a training step, and a saved sampler
checkpoint of them. Otherwise RL losses would see an off-policy ratio that is not there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import eztinker
from eztinker import types
from tests.rl.rl_helpers import forward_logprobs, plain_datum, random_tokens

MEAN_TOL, MAX_TOL, KL_TOL = 1e-5, 1e-4, 1e-9


@dataclass(frozen=True)
class Parity:
    mean_abs: float  # mean |lp - q| over sampled tokens
    max_abs: float
    kl: float  # k3 estimate of KL(sampler || learner): mean of (r - 1) - log r, r = exp(lp - q)
    tokens: int

    def __str__(self) -> str:
        return (
            f"mean|lp-q| {self.mean_abs:.2e} max {self.max_abs:.2e} kl {self.kl:.2e} "
            f"over {self.tokens} tokens"
        )


def parity(
    sampler: eztinker.SamplingClient, learner: eztinker.TrainingClient, prompt: list[int], seed: int
) -> tuple[Parity, list[list[int]]]:
    params = types.SamplingParams(max_tokens=10, temperature=1.0, seed=seed)
    result = sampler.sample(prompt, 6, params, include_prompt_logprobs=True).result()
    sequences = [prompt + s.tokens for s in result.sequences]
    learned = forward_logprobs(learner, [plain_datum(tokens) for tokens in sequences])
    assert result.prompt_logprobs is not None and result.prompt_logprobs[0] is None
    sampled_prompt = np.asarray(result.prompt_logprobs[1:], dtype=np.float32)
    diffs = []
    for seq, lp in zip(result.sequences, learned, strict=True):
        # Position i reads tokens[i] and predicts tokens[i + 1]: the k sampled tokens are the
        # targets of the last k positions, the prompt's tokens 1.. those of the first ones.
        assert len(lp) == len(prompt) + len(seq.tokens) - 1
        diffs.append(lp[len(prompt) - 1 :] - np.asarray(seq.logprobs))
        assert np.abs(lp[: len(prompt) - 1] - sampled_prompt).max() < MAX_TOL
    d = np.concatenate(diffs).astype(np.float64)
    found = Parity(np.abs(d).mean(), np.abs(d).max(), (np.expm1(d) - d).mean(), len(d))
    return found, sequences


def assert_parity(found: Parity, label: str) -> None:
    print(f"{label}: {found}")
    assert found.mean_abs < MEAN_TOL and found.max_abs < MAX_TOL and found.kl < KL_TOL, label


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_sampler_logprobs_equal_learner_logprobs(sdk: eztinker.ServiceClient, model: str) -> None:
    rng = np.random.default_rng(3)
    tc = sdk.create_lora_training_client(model, rank=8, seed=4)
    prompt = tc.get_tokenizer().encode("Once upon a time, the little dog")

    # The base model: a fresh adapter (lora_B = 0) computes exactly the base.
    base = sdk.create_sampling_client(base_model=model)
    found, _ = parity(base, tc, prompt, seed=1)
    assert_parity(found, f"{model} base")

    # The run's live weights after a training step.
    sft = [plain_datum(prompt + random_tokens(rng, 8))]
    tc.forward_backward(sft).result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    found, sequences = parity(tc.create_sampling_client(), tc, prompt, seed=2)
    assert_parity(found, f"{model} live")
    # ... which really differ from the base (the comparison above is not the base's again).
    base_lp = base.compute_logprobs(sequences[0]).result()
    trained_lp = forward_logprobs(tc, [plain_datum(sequences[0])])[0]
    assert np.abs(np.asarray(base_lp[1:], dtype=np.float32) - trained_lp).max() > 1e-2

    # A saved sampler checkpoint of the same weights, by sampling and by compute_logprobs.
    saved = tc.save_weights_and_get_sampling_client(f"parity-{model}")
    found, sequences = parity(saved, tc, prompt, seed=3)
    assert_parity(found, f"{model} checkpoint {saved.model_path}")
    scored = saved.compute_logprobs(sequences[1]).result()
    assert scored[0] is None
    learned = forward_logprobs(tc, [plain_datum(sequences[1])])[0]
    assert np.abs(np.asarray(scored[1:], dtype=np.float32) - learned).max() < MAX_TOL
    sdk.delete_run(tc.run_id).result()
