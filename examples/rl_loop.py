"""Reinforcement learning with EZTinker: a GRPO-style loop you can read top to bottom.

The task is verifiable and tiny: the reward of a completion is the fraction of its tokens whose
text contains the letter --letter ("o" by default). An untrained model (the built-in tiny
models have random weights) already scores ~0.25, so there is signal from the first step.

Each step samples --group-size completions for each prompt from the latest saved weights,
scores them, centres the rewards within each group (the advantage), and trains on the batch
with an RL loss (importance_sampling or ppo), split into --minibatches optimizer steps that are
all submitted at once and pipelined on the server. Each step prints the mean reward, the loss
per token and, one value per minibatch ("a/b"), the sampler/learner KL (k3 estimator), the mean
|lp - q| and the clip fraction. The first minibatch is on-policy, so it shows sampler/learner
parity (a KL of ~0); later ones train after an update and show the off-policy drift.

    uv run python examples/rl_loop.py --base-url http://localhost:8000 --steps 20

The SDK mirrors Tinker's: with `import tinker` and Tinker's base URL, this loop runs there too.
"""

from __future__ import annotations

import argparse
import math
import random

import numpy as np

import eztinker
from eztinker import types

PROMPTS = ["Once upon a time", "The little dog", "In the morning,", "She opened the door and"]

parser = argparse.ArgumentParser(description="GRPO-style RL on a toy verifiable reward.")
parser.add_argument("--base-url", help="server URL (default: EZTINKER_BASE_URL or localhost:8000)")
parser.add_argument("--model", default="tiny-gpt2", help="base model")
parser.add_argument("--steps", type=int, default=20, help="sampling + training rounds")
parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
parser.add_argument("--loss", default="ppo", choices=["importance_sampling", "ppo"])
parser.add_argument("--seed", type=int, default=0, help="seeds the LoRA init and the sampler")
parser.add_argument("--group-size", type=int, default=8, help="samples per prompt")
parser.add_argument("--max-tokens", type=int, default=12, help="new tokens per sample")
parser.add_argument("--minibatches", type=int, default=2, help="optimizer steps per batch")
parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
parser.add_argument("--letter", default="o", help="the rewarded letter")


def rl_datum(prompt: list[int], seq: types.SampledSequence, advantage: float) -> types.Datum:
    """Prompt + completion; the loss (weight 1) only on the sampled tokens.

    Position i reads tokens[i] and predicts tokens[i + 1], so the completion's tokens are the
    targets of the last len(completion) positions. ``logprobs`` are the sampler's (q).
    """
    tokens = prompt + seq.tokens
    pad = [0.0] * (len(prompt) - 1)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": pad + list(seq.logprobs or []),
            "advantages": pad + [advantage] * len(seq.tokens),
            "weights": pad + [1.0] * len(seq.tokens),  # keeps the prompt out of the metrics
        },
    )


def per_minibatch(metrics: list[dict[str, float]], key: str, fmt: str) -> str:
    """One value per minibatch ("kl 7e-14/4e-02"), "-" where the loss has no such metric."""
    return "/".join(format(m[key], fmt) if key in m else "-" for m in metrics)


def main() -> None:
    args = parser.parse_args()
    random.seed(args.seed)
    service = eztinker.ServiceClient(base_url=args.base_url)
    training_client = service.create_lora_training_client(
        args.model, rank=args.rank, seed=args.seed
    )
    tokenizer = training_client.get_tokenizer()
    print(f"created run {training_client.run_id} on {args.model}, loss {args.loss}")

    # 1. The reward: which tokens contain the letter (about a quarter of the vocabulary).
    rewarded = {t for t in range(len(tokenizer)) if args.letter in tokenizer.decode([t])}
    print(f"{len(rewarded)} of {len(tokenizer)} tokens contain {args.letter!r}")

    def reward(tokens: list[int]) -> float:
        return sum(t in rewarded for t in tokens) / max(1, len(tokens))

    prompts = [tokenizer.encode(p) for p in PROMPTS]
    adam = types.AdamParams(learning_rate=args.lr)
    sampling_client = training_client.save_weights_and_get_sampling_client("rl-step-000")
    for step in range(args.steps):
        # 2. Sample a group per prompt from the current weights (all requests in flight at once).
        futures = []
        for i, prompt in enumerate(prompts):
            seed = args.seed * 1_000_003 + step * 101 + i  # reproducible, distinct per request
            params = types.SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=seed)
            futures.append(sampling_client.sample(prompt, args.group_size, params))
        groups = [future.result().sequences for future in futures]

        # 3. Rewards and group-centred advantages (GRPO, divided by the group's std).
        batch, rewards = [], []
        for prompt, group in zip(prompts, groups, strict=True):
            scores = np.array([reward(seq.tokens) for seq in group])
            advantages = (scores - scores.mean()) / (scores.std() + 1e-6)
            rewards.extend(scores)
            batch += [rl_datum(prompt, s, float(a)) for s, a in zip(group, advantages, strict=True)]

        # 4. Train: every minibatch's forward_backward + optim_step submitted before any wait.
        random.shuffle(batch)
        size = math.ceil(len(batch) / args.minibatches)
        pending = []
        for start in range(0, len(batch), size):
            fb = training_client.forward_backward(batch[start : start + size], args.loss)
            pending.append((fb, training_client.optim_step(adam)))
        metrics = [fb.result().metrics for fb, _ in pending]
        for _, optim in pending:
            optim.result()

        # 5. The next round samples the new weights.
        sampling_client = training_client.save_weights_and_get_sampling_client(
            f"rl-step-{step + 1:03d}"
        )

        tokens = sum(len(seq.tokens) for group in groups for seq in group)
        loss = sum(m["loss:sum"] for m in metrics) / tokens
        print(
            f"step {step + 1:3d} reward {np.mean(rewards):.3f} loss {loss:+.4f} "
            f"kl {per_minibatch(metrics, 'kl_sampler_learner:mean', '.1e')} "
            f"|lp-q| {per_minibatch(metrics, 'logprob_diff_abs:mean', '.1e')} "
            f"clip {per_minibatch(metrics, 'clip_fraction:mean', '.3f')}"
        )

    print(f"done: run {training_client.run_id}, sampler weights {sampling_client.model_path}")


if __name__ == "__main__":
    main()
