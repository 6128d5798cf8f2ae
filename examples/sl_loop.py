"""Supervised fine-tuning with EZTinker: a training loop you can read top to bottom.

Trains a LoRA adapter on prompt/completion pairs (the small chat set that ships with EZTinker,
eztinker_tasks/data/chat.jsonl, by default), with the loss on the completion tokens only, and
shows what it learnt: the same prompts answered by the base model before training and by the
trained weights after, next to the completion it was trained on, and the loss per step.

The built-in models (tiny-gpt2, tiny-llama) have random weights: they cannot learn the tasks
themselves (reversing words, sums) in a minute, but they learn a few examples by heart, which
is what the default --examples 8 shows. On a real model (--model Qwen/Qwen2.5-0.5B), pass
--examples 0 to train on every example.

Each step submits forward_backward and optim_step together (they are pipelined on the server)
and then waits for both. Every --save-every steps it saves a resumable state and writes its
path to --state-file; run the script again and it resumes from there (or pass --resume-from
<run_id>/<name>; --fresh starts over).

    uv run python examples/sl_loop.py --base-url http://localhost:8000

The SDK mirrors Tinker's: with `import tinker` and Tinker's base URL, this loop runs there too.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

import eztinker
from eztinker import types

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "eztinker_tasks" / "data" / "chat.jsonl"

parser = argparse.ArgumentParser(description="LoRA supervised fine-tuning on a chat dataset.")
parser.add_argument("--base-url", help="server URL (default: EZTINKER_BASE_URL or localhost:8000)")
parser.add_argument("--model", default="tiny-gpt2", help="base model")
parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL of prompt/completion")
parser.add_argument("--examples", type=int, default=8, help="train on the first N (0: all)")
parser.add_argument("--steps", type=int, default=30, help="optimizer steps in total")
parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
parser.add_argument("--save-every", type=int, default=10, help="save a state every N steps")
parser.add_argument("--state-file", type=Path, default=Path("sl_loop_state.json"))
parser.add_argument("--resume-from", help="state checkpoint path '<run_id>/<name>' to resume")
parser.add_argument("--fresh", action="store_true", help="ignore --state-file: start a new run")
parser.add_argument("--show", type=int, default=4, help="prompts to sample before and after")


def build_datum(tokenizer, prompt: str, completion: str) -> types.Datum:
    """Prompt + completion + EOS; weight 1 on completion tokens, 0 on the prompt."""
    prompt_tokens = tokenizer.encode(prompt, add_special_tokens=False)
    completion_tokens = tokenizer.encode(completion, add_special_tokens=False)
    completion_tokens.append(tokenizer.eos_token_id)
    tokens = prompt_tokens + completion_tokens
    weights = [0.0] * len(prompt_tokens) + [1.0] * len(completion_tokens)
    # Position i reads tokens[i] and predicts tokens[i + 1].
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]},
    )


def complete(sampling_client, tokenizer, prompts: list[str]) -> list[str]:
    """Greedy completions of ``prompts``, all submitted at once; each stops at EOS or newline."""
    params = types.SamplingParams(max_tokens=16, temperature=0.0, stop=["\n"])
    futures = [
        sampling_client.sample(types.ModelInput.from_ints(tokenizer.encode(p)), 1, params)
        for p in prompts
    ]
    sequences = [f.result().sequences[0] for f in futures]
    return [tokenizer.decode(s.tokens, skip_special_tokens=True) for s in sequences]


def print_loss_table(losses: dict[int, float], rows: int = 10) -> None:
    """The loss per completion token at about ``rows`` evenly spaced steps, with a bar each."""
    steps = sorted(losses)
    stride = max(1, len(steps) // rows)
    shown = sorted({*steps[::stride], steps[-1]})
    top = max(losses[s] for s in shown) or 1.0
    print("\n step  loss per completion token")
    for s in shown:
        print(f"{s:5d}  {losses[s]:7.4f} {'█' * max(1, round(40 * losses[s] / top))}")


def main() -> None:
    args = parser.parse_args()
    service = eztinker.ServiceClient(base_url=args.base_url)

    # 1. A training client: resumed from the last saved state, or a fresh LoRA run.
    resume_from = args.resume_from
    if resume_from is None and not args.fresh and args.state_file.exists():
        resume_from = json.loads(args.state_file.read_text())["state_path"]
    if resume_from:
        training_client = service.create_training_client_from_state_with_optimizer(resume_from)
        start_step = training_client.get_info().step
        print(f"resumed from {resume_from} at step {start_step} (run {training_client.run_id})")
    else:
        training_client = service.create_lora_training_client(args.model, rank=args.rank, seed=0)
        start_step = 0
        print(f"created run {training_client.run_id} on {args.model}")
    model = training_client.get_info().base_model

    # 2. The dataset, tokenised with the model's own tokenizer.
    tokenizer = training_client.get_tokenizer()
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    rows = rows[: args.examples] if args.examples > 0 else rows
    data = [build_datum(tokenizer, row["prompt"], row["completion"]) for row in rows]
    print(f"training on {len(data)} examples from {args.data.name}")

    # 3. What the base model says to a few training prompts, before any training.
    shown = rows[: args.show]
    base_client = service.create_sampling_client(base_model=model)
    before = complete(base_client, tokenizer, [row["prompt"] for row in shown])

    # 4. The loop: submit forward_backward and optim_step, then wait for both.
    adam = types.AdamParams(learning_rate=args.lr)
    losses: dict[int, float] = {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, TextColumn("loss {task.fields[loss]}")) as progress:
        task = progress.add_task("training", total=args.steps, completed=start_step, loss="-")
        for step in range(start_step, args.steps):
            batch = random.Random(step).sample(data, min(args.batch_size, len(data)))
            fb_future = training_client.forward_backward(batch, "cross_entropy")
            optim_future = training_client.optim_step(adam)
            fb_result = fb_future.result()
            optim_result = optim_future.result()

            completion_tokens = sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in batch)
            loss = fb_result.metrics["loss:sum"] / completion_tokens
            losses[step + 1] = loss
            progress.update(task, advance=1, loss=f"{loss:.4f}")
            grad_norm = (optim_result.metrics or {}).get("grad_norm", 0.0)
            progress.console.print(
                f"step {step + 1}/{args.steps} loss {loss:.4f} grad_norm {grad_norm:.3f}"
            )

            if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                saved = training_client.save_state(f"sl-step-{step + 1:05d}").result()
                state = {"run_id": training_client.run_id, "state_path": saved.path}
                args.state_file.write_text(json.dumps({**state, "step": step + 1}) + "\n")
                progress.console.print(f"saved state {saved.path}")
    if losses:
        print_loss_table(losses)

    # 5. The same prompts, answered by the trained weights (greedy).
    sampling_client = training_client.save_weights_and_get_sampling_client()
    after = complete(sampling_client, tokenizer, [row["prompt"] for row in shown])
    print("\nsamples (greedy; each stops at EOS or a newline)")
    for i, (row, old, new) in enumerate(zip(shown, before, after, strict=True), 1):
        print(f"sample {i}: {row['prompt']!r}")
        print(f"  base model: {old!r}")
        print(f"  trained:    {new!r}")
        print(f"  target:     {row['completion']!r}")
    learnt = sum(
        new.strip() == row["completion"].strip() for row, new in zip(shown, after, strict=True)
    )
    print(f"\n{learnt} of {len(shown)} samples now match their training completion")
    print(f"done: run {training_client.run_id}, sampler weights {sampling_client.model_path}")


if __name__ == "__main__":
    main()
