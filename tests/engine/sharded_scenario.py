"""One scenario run on a plain engine and on a 2-rank sharded engine (``test_sharded``).

``scenario(engine)`` drives any ``Backend`` through create / forward_backward / optim_step /
forward / sample / save / load and returns the numbers as plain lists. ``rank_main`` is one
rank of a multi-GPU worker (spawned by the test): rank 0 runs the scenario on a ``LeadEngine``
and writes its JSON; the others follow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from eztinker_tasks.engine import Engine, EngineConfig, lockstep
from eztinker_tasks.engine.commands import follow
from eztinker_tasks.engine.distributed import LeadEngine
from eztinker_tasks.types import AdamParams, Datum, LoraSpec, SampleSource, SamplingParams

BASE = "tiny-llama"


def _datum(tokens: list[int]) -> Datum:
    return Datum(tuple(tokens), {"target_tokens": [*tokens[1:], 0]})


DATA = [
    _datum([5, 9, 17, 33, 2, 8, 11]),
    _datum([3, 4, 5]),
    _datum([40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]),
    _datum([7, 7, 7, 7, 7]),
    _datum([100, 200]),
]


def _grads(engine: Any, run_id: str) -> list[float]:
    inner = engine.engine if isinstance(engine, LeadEngine) else engine
    run = inner._runs[run_id]
    return torch.cat([leaf.grad.flatten() for leaf in run.leaves]).tolist()


def _weights(engine: Any, run_id: str) -> list[float]:
    inner = engine.engine if isinstance(engine, LeadEngine) else engine
    run = inner._runs[run_id]
    return torch.cat([leaf.detach().flatten() for leaf in run.leaves]).tolist()


def scenario(engine: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    engine.create_run("r1", BASE, LoraSpec(rank=4, seed=3))
    fb = engine.forward_backward("r1", DATA)
    out["fb_logprobs"] = [o["logprobs"] for o in fb.loss_fn_outputs]
    out["fb_loss"] = fb.metrics["loss:sum"]
    out["grads"] = _grads(engine, "r1")
    # a single datum: one rank gets no row and runs a dummy token
    engine.forward_backward("r1", DATA[1:2])
    out["grads2"] = _grads(engine, "r1")
    step = engine.optim_step("r1", AdamParams(learning_rate=1e-2, grad_clip_norm=1.0))
    out["grad_norm"] = step.metrics["grad_norm"]
    out["weights"] = _weights(engine, "r1")
    fwd = engine.forward("r1", DATA)
    out["fwd_logprobs"] = [o["logprobs"] for o in fwd.loss_fn_outputs]
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=11)
    sample = engine.sample(SampleSource(run_id="r1"), [5, 9, 17], 3, params, prompt_logprobs=True)
    out["sample_tokens"] = [s.tokens for s in sample.sequences]
    out["sample_logprobs"] = [s.logprobs for s in sample.sequences]
    out["prompt_logprobs"] = sample.prompt_logprobs
    engine.save_state("r1", "s1")
    sampler_ckpt = engine.save_weights_for_sampler("r1", "w1")
    engine.create_run_from_checkpoint("r2", "r1/s1")
    out["loaded_weights"] = _weights(engine, "r2")
    fwd2 = engine.forward("r2", DATA)
    out["loaded_logprobs"] = [o["logprobs"] for o in fwd2.loss_fn_outputs]
    greedy = SamplingParams(max_tokens=5, temperature=0.0)
    ck = engine.sample(SampleSource(checkpoint=sampler_ckpt.path), [3, 4], 1, greedy)
    out["checkpoint_sample"] = [s.tokens for s in ck.sequences]
    # many runs in one pass (the clock cycle), one of them with a single datum
    from eztinker_tasks.types import CallSpec

    results = engine.run_calls([CallSpec("r1", DATA[:3]), CallSpec("r2", DATA[3:4])])
    out["cycle_logprobs"] = [[o["logprobs"] for o in r.loss_fn_outputs] for r in results]
    out["cycle_grads_r2"] = _grads(engine, "r2")
    engine.delete_run("r2")
    return out


def config(
    data_dir: Path, checkpoints_dir: Path, device: str, dtype: str, checkpointing: str = "never"
) -> EngineConfig:
    return EngineConfig(
        data_dir=data_dir,
        checkpoints_dir=checkpoints_dir,
        device=device,
        dtype=dtype,
        activation_checkpointing=checkpointing,
    )


def rank_main(
    rank: int,
    world: int,
    init: str,
    data_dir: str,
    ckpt: str,
    device: str,
    dtype: str,
    out: str,
    checkpointing: str = "never",
) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    dev = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
    group = lockstep.init(rank, world, dev, init, timeout_s=120)
    engine = Engine(config(Path(data_dir), Path(ckpt), str(dev), dtype, checkpointing))
    if rank == 0:
        lead = LeadEngine(engine, group)
        result = scenario(lead)
        from torch.distributed.tensor import DTensor

        model = engine.models.get(BASE).model
        layers = [p for n, p in model.named_parameters() if ".layers." in n]
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in layers)
        result["layer_share"] = local / sum(p.numel() for p in layers)
        lead.stop()
        Path(out).write_text(json.dumps(result))
    else:
        follow(engine, group)
    torch.distributed.destroy_process_group()
