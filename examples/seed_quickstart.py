"""The seed README's quick start, as plain HTTP calls (no SDK): what a new user copies.

Creates a run on the server's default built-in model, trains it for a few steps on one
sentence with the seed's request shapes ({input_ids, target_ids}; {learning_rate,
weight_decay}), samples "Once upon a time," and saves "checkpoint_v1". Every operation
answers at once with a job id; the script polls GET /v1/jobs/<job_id> until it is done.

    uv run python examples/seed_quickstart.py --base-url http://localhost:8000
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import requests

parser = argparse.ArgumentParser(description="The seed README's quick start over HTTP.")
parser.add_argument(
    "--base-url", default=os.environ.get("EZTINKER_BASE_URL", "http://localhost:8000")
)
parser.add_argument("--steps", type=int, default=5, help="forward_backward + optim_step rounds")
parser.add_argument("--lr", type=float, default=2e-4, help="learning rate (the seed's 2e-4)")


def check(response: requests.Response) -> dict:
    """The JSON body, or exit with the server's error message."""
    if response.status_code >= 400:
        sys.exit(f"error: {response.status_code} {response.json().get('message')}")
    return response.json()


def wait_for_job(base: str, job_id: str) -> dict:
    """Poll the job until it finishes; return its result (exit on failure)."""
    while True:
        job = check(requests.get(f"{base}/v1/jobs/{job_id}", params={"wait": 10}, timeout=60))
        if job["status"] == "succeeded":
            return job["result"]
        if job["status"] == "failed":
            sys.exit(f"error: job {job_id} failed: {job['error']['message']}")
        time.sleep(0.1)


def main() -> None:
    args = parser.parse_args()
    base = args.base_url.rstrip("/")

    health = check(requests.get(f"{base}/health", timeout=10))
    print(f"health: {health['status']}, {len(health['workers'])} worker(s)")

    # Create a training run on the default built-in model.
    model = check(requests.get(f"{base}/v1/models", timeout=10))["default_model"]
    run = check(requests.post(f"{base}/v1/runs", json={"base_model": model}, timeout=60))
    run_id = run["run_id"]
    wait_for_job(base, run["job_id"])
    print(f"created run {run_id} on {model}")

    # The training loop, written by the user: forward_backward, wait, optim_step.
    text = "The river ran slowly past the old mill, carrying leaves and the last light."
    input_ids = check(requests.post(f"{base}/v1/tokenize", json={"text": text}, timeout=10))
    input_ids = input_ids["tokens"]
    for step in range(1, args.steps + 1):
        job = check(
            requests.post(
                f"{base}/v1/runs/{run_id}/forward_backward",
                json={"input_ids": input_ids, "target_ids": input_ids},
                timeout=60,
            )
        )
        loss = wait_for_job(base, job["job_id"])["metrics"]["loss:sum"]
        job = check(
            requests.post(
                f"{base}/v1/runs/{run_id}/optim_step",
                json={"learning_rate": args.lr, "weight_decay": 0.01},
                timeout=60,
            )
        )
        wait_for_job(base, job["job_id"])
        print(f"step {step}: loss {loss:.4f} (summed over {len(input_ids) - 1} predicted tokens)")

    # Sampling for evaluation (the seed's request; add "run_id" to sample the trained run).
    job = check(
        requests.post(
            f"{base}/v1/sample",
            json={"prompt": "Once upon a time,", "max_new_tokens": 50, "temperature": 0.7},
            timeout=60,
        )
    )
    sample = wait_for_job(base, job["job_id"])
    print(f"sample: Once upon a time,{sample['sequences'][0]['text']}")

    # Save a checkpoint.
    job = check(
        requests.post(f"{base}/v1/runs/{run_id}/save", json={"name": "checkpoint_v1"}, timeout=60)
    )
    saved = wait_for_job(base, job["job_id"])
    print(f"saved {saved['path']} (step {saved['step']}, {saved['size_bytes']} bytes)")


if __name__ == "__main__":
    main()
