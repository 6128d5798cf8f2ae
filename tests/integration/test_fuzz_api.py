"""Property-based fuzzing of the whole HTTP API from its own OpenAPI spec (schemathesis).

Every operation of ``/openapi.json`` gets requests generated from its spec, valid ones and
invalid ones (schemathesis' positive and negative modes), sent over HTTP to a real stack of its
own (embedded broker, one CPU worker, gunicorn). Each response must:

- not be a 5xx (``not_a_server_error``);
- have a status the spec lists for that operation (``status_code_conformance``: the spec has
  no catch-all ``default``, each error an operation can answer is listed with the one error
  envelope), with a documented content type and a body that matches its schema
  (``content_type_conformance``, ``response_schema_conformance``, ``response_headers_...``);
- be a 4xx when the request breaks the spec (``negative_data_rejection``; 413 and 414 count
  as refusals too);
- if it accepted an operation (201/202), lead to a future that finishes without a ``server``
  error (nothing that passed validation crashes the worker).

Left out, as outside what the spec can promise: ``positive_data_acceptance`` (a request that
fits the spec may still be refused: token ids past a model's vocabulary, the service's
configured limits, "exactly one of prompt or prompt_tokens", an unknown run id) and the checks
that need auth or state links the spec does not describe (``ignored_auth``, ``use_after_free``,
``ensure_resource_availability``: the stack runs without API keys and the spec has no links).

No generated input is excluded. The schema is built from the app factory in this process
(``known`` checks that the stack serves the same spec) and parametrized per operation:
``schemathesis.pytest.from_fixture`` fails on pytest 9.2 (it sets ``node._nodeid``).

Determinism: Hypothesis is derandomized (the same requests every run) with no example
database. Bounded work for the worker: the stack's sampling and batch limits are small
(``FUZZ_ENV``), run creation gets fewer examples and every run it creates is deleted at once.
The spec's examples, and half of the other positive cases, name a real run (future,
checkpoint, tokenizer file) so that they get past the 404 to the worker; the rest name unknown
ids and must 404 fast. Afterwards the stack must still be healthy and train a run normally.
"""

from __future__ import annotations

import json
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.generation.meta import TestPhase
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Service, result_of, start_service

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]
# Generated examples per operation; operations with few distinct inputs (no parameters) get
# fewer. Creating runs loads the worker most, so it gets fewer.
EXAMPLES = 110
CREATE_RUN_EXAMPLES = 25
MIN_REQUESTS = 2000
# Small limits, so that accepted samples and batches stay cheap on a CPU worker.
FUZZ_ENV = {
    "HF_HUB_OFFLINE": "1",  # a generated hub id is refused at once, never fetched
    "EZTINKER_MAX_SAMPLES": "4",
    "EZTINKER_MAX_SAMPLE_TOKENS": "16",
    "EZTINKER_MAX_DATUMS": "8",
}
CHECKPOINT = "fuzz_ckpt"
FUZZ_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
)


def _spec() -> dict[str, Any]:
    """The spec the fuzzed stack serves (the same code; compared with it in ``known``)."""
    from config import Settings
    from eztinker_web import create_app

    return create_app(Settings()).test_client().get("/openapi.json").get_json()


SPEC = _spec()
CONFIG = schemathesis.Config.from_dict(
    {
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": [400, 401, 404, 405, 409, 413, 414, 415, 422]
            }
        }
    }
)
schema = schemathesis.openapi.from_dict(SPEC, config=CONFIG)


@dataclass
class Tally:
    """What the fuzzing sent and got, across the tests of this module."""

    sent: Counter[str] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    slowest_404_s: float = 0.0
    created_runs: list[str] = field(default_factory=list)
    futures: list[str] = field(default_factory=list)  # of every accepted operation


TALLY = Tally()


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Service]:
    svc = start_service(tmp_path_factory.mktemp("fuzz"), model_cache, extra_env=FUZZ_ENV)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def known(fuzz_stack: Service) -> dict[str, str]:
    """Real ids for positive cases to name: a ready run, its checkpoint, a finished future."""
    with fuzz_stack.http as http:
        assert http.get("/openapi.json").json() == SPEC
        created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4})
        result_of(http, created)
        run_id = created.json()["run_id"]
        result_of(http, http.post(f"/v1/runs/{run_id}/save", json={"name": CHECKPOINT}))
    return {
        "run_id": run_id,
        "future_id": created.json()["future_id"],
        "checkpoint": f"{run_id}/{CHECKPOINT}",
    }


def _point_at_real_ids(case: Any, known: dict[str, str]) -> None:
    """Point a positive case at real resources (DELETEs keep their unknown ids).

    New containers replace the generated ones: Hypothesis may hand the same ones out again.
    """
    path = case.operation.path
    if case.path_parameters and case.method != "DELETE":
        real = {
            "run_id": known["run_id"],
            "future_id": known["future_id"],
            "filename": "tokenizer.json",
            "name": "tiny-gpt2" if path.startswith("/v1/models") else CHECKPOINT,
        }
        case.path_parameters = {k: real.get(k, v) for k, v in case.path_parameters.items()}
    if isinstance(case.body, dict):
        body = dict(case.body)
        for key in ("run_id", "path", "checkpoint", "model_path", "from_state"):
            if isinstance(body.get(key), str):
                body[key] = known["run_id"] if key == "run_id" else known["checkpoint"]
        if isinstance(body.get("future_ids"), list):
            body["future_ids"] = [known["future_id"]]
        case.body = body


def _should_point_at_real_ids(case: Any) -> bool:
    """Whether a case names real resources: every positive example from the spec, and half of
    the other positive cases (chosen by their content, so a replayed case chooses the same)."""
    meta = case.meta
    if meta is None or meta.generation.mode != GenerationMode.POSITIVE:
        return False  # a negative case stays exactly as generated (and judged)
    if meta.phase.name == TestPhase.EXAMPLES:
        return True
    body = None if case.body is NOT_SET else case.body  # (its repr holds an address)
    content = json.dumps([case.path_parameters, case.query, body], sort_keys=True, default=repr)
    return zlib.crc32(content.encode()) % 2 == 0


def _fuzz(case: Any, stack: Service, known: dict[str, str]) -> None:
    if _should_point_at_real_ids(case):
        _point_at_real_ids(case, known)
    label = f"{case.method} {case.operation.path}"
    started = time.monotonic()
    response = case.call(base_url=stack.base_url, timeout=60)
    elapsed = time.monotonic() - started
    TALLY.sent[label] += 1
    TALLY.statuses[(label, response.status_code)] += 1
    if response.status_code == 404 and "{" in case.operation.path:
        TALLY.slowest_404_s = max(TALLY.slowest_404_s, elapsed)
    if response.status_code in (201, 202):
        TALLY.futures.append(response.json()["future_id"])
    if label == "POST /v1/runs" and response.status_code == 201:
        run_id = response.json()["run_id"]  # keep the worker to one fuzz run at a time
        TALLY.created_runs.append(run_id)
        httpx.delete(f"{stack.base_url}/v1/runs/{run_id}", timeout=60).raise_for_status()
    case.validate_response(response, checks=CHECKS)


@schema.exclude(method="POST", path="/v1/runs").parametrize()
@settings(FUZZ_SETTINGS, max_examples=EXAMPLES)
def test_fuzz_api(case: Any, fuzz_stack: Service, known: dict[str, str]) -> None:
    _fuzz(case, fuzz_stack, known)


@schema.include(method="POST", path="/v1/runs").parametrize()
@settings(FUZZ_SETTINGS, max_examples=CREATE_RUN_EXAMPLES)
def test_fuzz_create_run(case: Any, fuzz_stack: Service, known: dict[str, str]) -> None:
    _fuzz(case, fuzz_stack, known)


def _finished(http: httpx.Client, future_ids: list[str]) -> list[dict[str, Any]]:
    """The futures, once every one is done (long-polled 1,000 at a time)."""
    deadline = time.monotonic() + 300
    done: list[dict[str, Any]] = []
    for i in range(0, len(future_ids), 1000):
        chunk = future_ids[i : i + 1000]
        while True:
            body = http.post("/v1/futures/batch", json={"future_ids": chunk, "wait": 10}).json()
            if all(f["status"] in ("succeeded", "failed") for f in body["futures"]):
                break
            assert time.monotonic() < deadline, "accepted operations did not finish in 300 s"
        done += body["futures"]
    return done


def test_fuzzing_sent_enough_and_left_the_stack_healthy(
    fuzz_stack: Service, known: dict[str, str]
) -> None:
    methods = ("get", "post", "put", "patch", "delete")
    fuzzed = {f"{m.upper()} {p}" for p, ops in SPEC["paths"].items() for m in ops if m in methods}
    if not fuzzed <= set(TALLY.sent):
        pytest.skip("needs every operation fuzzed first (run the whole module)")
    # Requests to the spec's operations (schemathesis also tries methods the spec lacks: 405).
    total = sum(n for label, n in TALLY.sent.items() if label in fuzzed)
    print(
        f"\n{total} requests to the spec's {len(fuzzed)} operations "
        f"({sum(TALLY.sent.values()) - total} more with other methods); "
        f"slowest 404 on an unknown id: {TALLY.slowest_404_s:.3f} s"
    )
    for (label, status), count in sorted(TALLY.statuses.items()):
        if label in fuzzed:
            print(f"{count:6d}  {status}  {label}")
    assert total >= MIN_REQUESTS
    assert not [k for k in TALLY.statuses if k[1] >= 500]
    assert TALLY.slowest_404_s < 5.0  # unknown ids answer without touching the worker

    with fuzz_stack.http as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        # Every run the fuzzing created was deleted; only the known one is left.
        runs = {r["run_id"] for r in http.get("/v1/runs").json()["runs"]}
        assert runs == {known["run_id"]}, runs
        # Normal training still works, after everything queued so far.
        created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 8})
        result_of(http, created)
        run_id = created.json()["run_id"]
        tokens = http.post("/v1/tokenize", json={"text": "The river ran past the mill."})
        ids = tokens.json()["tokens"]
        fb = http.post(f"/v1/runs/{run_id}/forward_backward", json={"input_ids": ids})
        assert result_of(http, fb)["metrics"]["loss:sum"] > 0
        step = http.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 1e-3})
        result_of(http, step)
        run = http.get(f"/v1/runs/{run_id}").json()
        assert (run["status"], run["step"], run["tokens_trained"]) == ("ready", 1, len(ids) - 1)
        assert http.get(f"/v1/runs/{known['run_id']}").json()["status"] == "ready"
        for gone in TALLY.created_runs:  # the fuzz runs' deletions all went through
            assert http.get(f"/v1/runs/{gone}").status_code == 404
        # Every accepted operation finished, none with a server error (a crash on the worker).
        outcomes = Counter(
            (f["status"], (f["error"] or {}).get("category"), (f["error"] or {}).get("code"))
            for f in _finished(http, TALLY.futures)
        )
        print(f"{len(TALLY.futures)} accepted operations: {dict(outcomes)}")
        assert not [o for o in outcomes if o[0] != "succeeded" and o[1] != "user"], outcomes
        # What the fuzzing queued drains: the worker was never flooded.
        deadline = time.monotonic() + 120
        while any(depths := http.get("/health").json()["workers"][0]["queue_depths"].values()):
            assert time.monotonic() < deadline, depths
            time.sleep(0.5)
