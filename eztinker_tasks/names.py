"""Task and queue names: the public surface the web layer sends to (torch-free).

Every run has its own queue ``run.<run_id>``, bound to exactly one worker, so that worker (which
holds the run's LoRA weights and optimizer state) executes the run's operations one at a time in
submission order. Work that needs no run state (sampling a base model or a saved checkpoint)
goes to the shared ``SAMPLE_QUEUE`` that every worker serves.
"""

from __future__ import annotations

CREATE_RUN = "eztinker.create_run"
FORWARD_BACKWARD = "eztinker.forward_backward"
FORWARD = "eztinker.forward"
OPTIM_STEP = "eztinker.optim_step"
SAVE = "eztinker.save"
LOAD = "eztinker.load"
SAMPLE = "eztinker.sample"
COMPUTE_LOGPROBS = "eztinker.compute_logprobs"
DELETE_RUN = "eztinker.delete_run"
RECOVER_RUN = "eztinker.recover_run"

SAMPLE_QUEUE = "eztinker.sample"


def run_queue(run_id: str) -> str:
    return f"run.{run_id}"


def worker_queue(worker_name: str) -> str:
    """A queue only one worker consumes (for work addressed to that worker)."""
    return f"worker.{worker_name}"
