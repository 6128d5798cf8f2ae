"""A run's metrics history (``GET /v1/runs/<id>/metrics``) and recent operations: one point per
forward_backward and optim_step, equal to what each op's future answered, whatever path stored
the result (the op's own task or a pass it was coalesced into); a resent seq_id adds nothing.
Served as JSON and CSV; the CLI draws the loss curve from it."""

from __future__ import annotations

import csv
import io
import time
from typing import Any

import httpx
import pytest
import redis
from typer.testing import CliRunner

import eztinker
from eztinker.cli import app
from eztinker_tasks import names
from eztinker_tasks.metrics_history import forget_points, read_points, record_point
from tests.conftest import Service, result_of, wait_future

TOKENS = [5, 17, 42, 99, 7, 300, 12, 64]
FB = {"input_ids": TOKENS, "target_ids": TOKENS}
FB2 = {"input_ids": TOKENS[::-1], "target_ids": TOKENS[::-1]}


@pytest.fixture(scope="module")
def trained(service: Service) -> dict[str, Any]:
    """A run trained 3 steps of 2 pipelined forward_backwards + an optim_step (explicit
    seq_ids), with a forward and a save between: every future's body, by seq_id."""
    started = time.time()
    with service.http as http:
        created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4, "seed": 3})
        result_of(http, created)
        run_id = created.json()["run_id"]
        ops: list[tuple[int, str, dict[str, Any]]] = []
        seq = 0
        for _ in range(3):
            for body in (FB, FB2):
                seq += 1
                ops.append((seq, "forward_backward", body))
            seq += 1
            ops.append((seq, "optim_step", {"learning_rate": 5e-3}))
        seq += 1
        ops.append((seq, "forward", FB))
        seq += 1
        ops.append((seq, "save", {"name": "mid"}))
        sent = [  # all submitted before any is waited on: queued calls share passes
            (s, op, body, http.post(f"/v1/runs/{run_id}/{op}", json={**body, "seq_id": s}))
            for s, op, body in ops
        ]
        futures = {}
        for s, op, body, response in sent:
            assert response.status_code == 202, response.text
            done = wait_future(http, response.json()["future_id"])
            assert done["status"] == "succeeded", done
            futures[s] = {"op": op, "body": body, **done}
    return {"run_id": run_id, "futures": futures, "started": started, "ended": time.time()}


def test_one_point_per_forward_backward_and_optim_step(
    trained: dict[str, Any], http: httpx.Client
) -> None:
    body = http.get(f"/v1/runs/{trained['run_id']}/metrics").json()
    points = body["points"]
    recorded = {
        s: f for s, f in trained["futures"].items() if f["op"] in ("forward_backward", "optim_step")
    }
    assert [p["seq_id"] for p in points] == sorted(recorded)  # no forward, no save, no repeats
    step = 0
    for p in points:
        future = recorded[p["seq_id"]]
        assert p["op"] == future["op"]
        assert p["metrics"] == future["result"]["metrics"]  # the very numbers the op answered
        if p["op"] == "optim_step":
            step += 1
        assert p["step"] == step, (p, step)
        assert trained["started"] <= p["time"] <= trained["ended"]
    assert [p["step"] for p in points if p["op"] == "optim_step"] == [1, 2, 3]
    assert all(p["metrics"]["step"] == p["step"] for p in points if p["op"] == "optim_step")
    assert points[0]["metrics"]["loss:sum"] > 0 and "grad_norm" in points[2]["metrics"]
    # polling for what is new
    later = http.get(f"/v1/runs/{trained['run_id']}/metrics", params={"after": 6}).json()
    assert later["points"] == [p for p in points if p["seq_id"] > 6]


def test_some_calls_shared_a_pass_and_still_got_their_point(trained: dict[str, Any]) -> None:
    """The pipelined forward_backwards took the coalesced path (``cycle.answer``) at least
    once, so the test above covered it."""
    shared = [
        f
        for f in trained["futures"].values()
        if (f.get("timing") or {}).get("in_pass_of") not in (None, f["future_id"])
    ]
    assert shared, "no call was answered in another call's pass"


def test_a_resent_seq_id_adds_no_point(trained: dict[str, Any], http: httpx.Client) -> None:
    run_id = trained["run_id"]
    before = http.get(f"/v1/runs/{run_id}/metrics").json()["points"]
    first = trained["futures"][1]
    again = http.post(f"/v1/runs/{run_id}/forward_backward", json={**FB, "seq_id": 1})
    assert again.status_code == 202 and again.json()["future_id"] == first["future_id"]
    assert http.get(f"/v1/runs/{run_id}/metrics").json()["points"] == before


def test_csv_by_parameter_and_by_accept_header(trained: dict[str, Any], http: httpx.Client) -> None:
    run_id = trained["run_id"]
    points = http.get(f"/v1/runs/{run_id}/metrics").json()["points"]
    by_param = http.get(f"/v1/runs/{run_id}/metrics", params={"format": "csv"})
    by_header = http.get(f"/v1/runs/{run_id}/metrics", headers={"Accept": "text/csv"})
    for response in (by_param, by_header):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(response.text)))
        assert len(rows) == len(points)
        for row, p in zip(rows, points, strict=True):
            assert (int(row["seq_id"]), row["op"], int(row["step"])) == (
                p["seq_id"],
                p["op"],
                p["step"],
            )
            assert float(row["time"]) == p["time"]
            for name, value in p["metrics"].items():
                assert float(row[name]) == value  # (an optim_step's "step" is the step column)
            assert row["grad_norm"] == "" if p["op"] == "forward_backward" else row["grad_norm"]
    as_json = http.get(f"/v1/runs/{run_id}/metrics", headers={"Accept": "*/*"})
    assert as_json.headers["content-type"].startswith("application/json")


def test_bad_queries_and_unknown_runs_are_4xx(trained: dict[str, Any], http: httpx.Client) -> None:
    run_id = trained["run_id"]
    for params in ({"after": -1}, {"format": "xml"}, {"after": "x"}):
        bad = http.get(f"/v1/runs/{run_id}/metrics", params=params)
        assert bad.status_code == 422 and bad.json()["code"], bad.text
    bad = http.get(f"/v1/runs/{run_id}/operations", params={"limit": 0})
    assert bad.status_code == 422
    for what in ("metrics", "operations"):
        missing = http.get(f"/v1/runs/run_0123456789abcdef0123456789abcdef/{what}")
        assert missing.status_code == 404 and missing.json()["code"] == "unknown_run"


def test_recent_operations_with_timing(trained: dict[str, Any], http: httpx.Client) -> None:
    body = http.get(f"/v1/runs/{trained['run_id']}/operations", params={"limit": 5}).json()
    ops = body["operations"]
    assert [o["seq_id"] for o in ops] == [11, 10, 9, 8, 7]  # newest first
    assert [o["op"] for o in ops[:3]] == ["save", "forward", "optim_step"]
    for o in ops:
        assert o["status"] == "succeeded" and o["error"] is None and o["worker"]
        assert o["timing"]["run_ms"] >= 0 and o["timing"]["queued_ms"] >= 0
        assert o["future_id"] == trained["futures"][o["seq_id"]]["future_id"]


def test_sdk_and_cli_show_the_history(trained: dict[str, Any], service: Service) -> None:
    with eztinker.ServiceClient(base_url=service.base_url) as client:
        points = client.get_metrics(trained["run_id"])
    assert [p.seq_id for p in points] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert points[0].metrics["loss:sum"] == trained["futures"][1]["result"]["metrics"]["loss:sum"]
    shown = CliRunner().invoke(
        app, ["--base-url", service.base_url, "show", trained["run_id"]], env={"COLUMNS": "100"}
    )
    assert shown.exit_code == 0, shown.output
    assert "loss:sum by step" in shown.output and "\x1b[" not in shown.output
    assert any(ch in shown.output for ch in "⠁⠂⠄⡀⠈⠐⠠⢀")  # the curve is drawn (braille dots)


def test_a_deleted_runs_history_goes_with_it(service: Service, http: httpx.Client) -> None:
    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 2})
    result_of(http, created)
    run_id = created.json()["run_id"]
    result_of(http, http.post(f"/v1/runs/{run_id}/forward_backward", json=FB))
    assert len(http.get(f"/v1/runs/{run_id}/metrics").json()["points"]) == 1
    result_of(http, http.delete(f"/v1/runs/{run_id}"))
    assert http.get(f"/v1/runs/{run_id}/metrics").status_code == 404
    client = redis.Redis.from_url(service.redis_url)
    assert not client.exists(f"ezt:run:{run_id}:metrics")


def test_a_second_answer_of_a_seq_id_keeps_the_first_point(service: Service) -> None:
    """What a replayed or redelivered op would write (its seq_id answered again, with other
    numbers and a later time) adds nothing: the point of its first answer stays."""
    client = redis.Redis.from_url(service.redis_url)
    run_id = "run_metrics_guard"
    first = {"metrics": {"loss:sum": 2.5, "num_tokens:sum": 7.0}}
    for result, step in ((first, 3), ({"metrics": {"loss:sum": 9.0}}, 4)):
        with client.pipeline(transaction=True) as pipe:
            record_point(pipe, run_id, names.FORWARD_BACKWARD, 12, result, step)
            record_point(pipe, run_id, names.OPTIM_STEP, 13, {"metrics": {"grad_norm": step}}, step)
            record_point(pipe, run_id, names.FORWARD, 14, result, step)  # not a recorded op
            record_point(pipe, run_id, names.OPTIM_STEP, None, result, step)  # no seq_id
            pipe.execute()
    points = read_points(client, run_id)
    assert [(p.seq_id, p.op, p.step, p.metrics) for p in points] == [
        (12, "forward_backward", 3, first["metrics"]),
        (13, "optim_step", 3, {"grad_norm": 3.0}),
    ]
    assert read_points(client, run_id, after=12) == points[1:]
    forget_points(client, run_id)
    assert read_points(client, run_id) == []


def rewound_run(http: httpx.Client) -> tuple[str, dict[int, float]]:
    """A run trained 4 steps, loaded back to its state at step 2, then trained 2 more: its id
    and the loss of each step as the run now stands (steps 0-1 before the load, 2-3 after)."""
    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 2, "seed": 1})
    result_of(http, created)
    run_id = created.json()["run_id"]
    now: dict[int, float] = {}

    def step(i: int, body: dict[str, Any]) -> None:
        fb = result_of(http, http.post(f"/v1/runs/{run_id}/forward_backward", json=body))
        now[i] = fb["metrics"]["loss:sum"]
        result_of(http, http.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 1e-2}))

    for i in range(4):
        step(i, FB)
        if i == 1:
            result_of(http, http.post(f"/v1/runs/{run_id}/save", json={"name": "at2"}))
    result_of(http, http.post(f"/v1/runs/{run_id}/load", json={"path": f"{run_id}/at2"}))
    for i in (2, 3):
        step(i, FB2)  # other data: other losses than the abandoned steps 2-3
    return run_id, now


def test_after_loading_an_earlier_state_the_curve_is_the_runs_own(
    service: Service, http: httpx.Client
) -> None:
    """Loading the state of step 2 into a run at step 4 makes steps 2-3 again; the loss curve
    (`eztinker show`, ``loss_by_step``) shows the run as it now stands, not the two branches'
    losses added up."""
    from eztinker.history import loss_by_step

    run_id, now = rewound_run(http)
    with eztinker.ServiceClient(base_url=service.base_url) as client:
        points = client.get_metrics(run_id)
    assert len([p for p in points if p.op == "forward_backward"]) == 6  # the history keeps all
    curve = loss_by_step(points)
    assert [s for s, _ in curve] == [0, 1, 2, 3]
    assert [v for _, v in curve] == pytest.approx([now[i] for i in range(4)])
