"""Every route of the app, walked with two tenants: nothing of one is read or written by the other.

The routes come from the app's own url_map (checked against its OpenAPI spec), and each must
have a case below, so a new route fails this module until it is given one. For each route
with tenant objects, bob aims at alice's (her run, future, checkpoints, her model in lists):
he gets the very answer an object that never existed gets (404, same code and message), lists
leave them out, and alice's run is unchanged afterwards. The same request from alice (and
reads from the admin key) succeeds, so each 404 is the tenant check, not a broken request.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

import eztinker
from config import Settings
from eztinker_web import create_app
from tests.integration.tenant_openai_cases import CASES as OPENAI_CASES
from tests.integration.tenant_tinker_cases import CASES as TINKER_CASES
from tests.integration.tenant_world import FB, KEYS, TOKENS, World, build_world, elapsed

Case = Callable[[World], None]
CASES: dict[tuple[str, str], Case] = {}
MISSING_RUN = "run_0123456789abcdef0123456789abcdef"


def route(method: str, rule: str) -> Callable[[Case], Case]:
    def add(fn: Case) -> Case:
        CASES[(method, rule)] = fn
        return fn

    return add


def app_routes() -> list[tuple[str, str]]:
    """(method, rule) of every route the app serves, from its url_map."""
    app = create_app(Settings())
    return sorted(
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"})
    )


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[World]:
    world = build_world(tmp_path_factory.mktemp("tenants"), model_cache, {})
    yield world
    world.close()


def unknown(foreign: httpx.Response, missing: httpx.Response, foreign_id: str, missing_id: str):
    """``foreign`` (another tenant's object) reads exactly as ``missing`` (none): a 404."""
    assert foreign.status_code == missing.status_code == 404, (foreign.text, missing.text)
    expected = missing.json()
    expected["message"] = expected["message"].replace(missing_id, foreign_id)
    assert foreign.json() == expected


@contextmanager
def untouched(w: World, who: str = "alice", run: str = "") -> Generator[None]:
    """Whatever happens inside, the run (alice's by default) is as it was."""
    run = run or w.a_run
    before = w.run_state(who, run)
    yield
    assert w.run_state(who, run) == before


# -- runs ------------------------------------------------------------------------------------
@route("GET", "/v1/runs")
def _list_runs(w: World) -> None:
    def runs(who: str) -> dict[str, str]:
        listed = w.get(who, "/v1/runs")
        assert listed.status_code == 200, listed.text
        return {r["run_id"]: r["tenant"] for r in listed.json()["runs"]}

    alice, bob, admin = runs("alice"), runs("bob"), runs("admin")
    assert alice.get(w.a_run) == "alice" and w.b_run not in alice
    assert bob.get(w.b_run) == "bob" and w.a_run not in bob
    assert set(alice.values()) == {"alice"} and set(bob.values()) == {"bob"}
    assert admin[w.a_run] == "alice" and admin[w.b_run] == "bob"
    assert not {w.a_run, w.b_run} & set(runs("default"))
    # the SDK reports whose each run is
    sdk = eztinker.ServiceClient(w.svc.base_url, api_key=KEYS["admin"])
    tenants = {r.run_id: r.tenant for r in sdk.list_runs()}
    assert (tenants[w.a_run], tenants[w.b_run]) == ("alice", "bob")


@route("POST", "/v1/runs")
def _create_run(w: World) -> None:
    missing = f"{MISSING_RUN}/s1"
    with untouched(w):
        foreign = w.post("bob", "/v1/runs", {"from_state": w.a_state})
        unknown(foreign, w.post("bob", "/v1/runs", {"from_state": missing}), w.a_state, missing)
    mine = w.post("alice", "/v1/runs", {"from_state": w.a_state})
    assert mine.json()["tenant"] == "alice"
    w.done("alice", mine)
    assert w.get("bob", f"/v1/runs/{mine.json()['run_id']}").status_code == 404
    assert w.delete("alice", f"/v1/runs/{mine.json()['run_id']}").status_code == 202


@route("GET", "/v1/runs/<run_id>")
def _get_run(w: World) -> None:
    missing = w.get("bob", f"/v1/runs/{MISSING_RUN}")
    unknown(w.get("bob", f"/v1/runs/{w.a_run}"), missing, w.a_run, MISSING_RUN)
    missing = w.get("default", f"/v1/runs/{MISSING_RUN}")
    unknown(w.get("default", f"/v1/runs/{w.a_run}"), missing, w.a_run, MISSING_RUN)
    assert w.get("alice", f"/v1/runs/{w.a_run}").json()["tenant"] == "alice"
    assert w.get("admin", f"/v1/runs/{w.a_run}").json()["tenant"] == "alice"
    assert w.get("admin", f"/v1/runs/{w.b_run}").json()["tenant"] == "bob"


@route("DELETE", "/v1/runs/<run_id>")
def _delete_run(w: World) -> None:
    with untouched(w):
        missing = w.delete("bob", f"/v1/runs/{MISSING_RUN}")
        unknown(w.delete("bob", f"/v1/runs/{w.a_run}"), missing, w.a_run, MISSING_RUN)
    spare = w.post("alice", "/v1/runs", {"base_model": "tiny-gpt2", "rank": 2})
    spare_id = spare.json()["run_id"]
    w.done("alice", spare)
    assert w.delete("bob", f"/v1/runs/{spare_id}").status_code == 404
    assert w.get("alice", f"/v1/runs/{spare_id}").json()["status"] == "ready"
    w.done("alice", w.delete("alice", f"/v1/runs/{spare_id}"))
    assert w.get("alice", f"/v1/runs/{spare_id}").status_code == 404


def _run_op(w: World, op: str, body: dict) -> None:
    """Bob's ``op`` on alice's run is unknown and changes nothing; alice's own succeeds."""
    with untouched(w):
        missing = w.post("bob", f"/v1/runs/{MISSING_RUN}/{op}", body)
        unknown(w.post("bob", f"/v1/runs/{w.a_run}/{op}", body), missing, w.a_run, MISSING_RUN)
        # also with a seq_id (the submit script's other path)
        body_seq = {**body, "seq_id": 10**9}
        missing = w.post("bob", f"/v1/runs/{MISSING_RUN}/{op}", body_seq)
        foreign = w.post("bob", f"/v1/runs/{w.a_run}/{op}", body_seq)
        unknown(foreign, missing, w.a_run, MISSING_RUN)
    w.done("alice", w.post("alice", f"/v1/runs/{w.a_run}/{op}", body))


@route("POST", "/v1/runs/<run_id>/forward_backward")
def _forward_backward(w: World) -> None:
    _run_op(w, "forward_backward", FB)


@route("POST", "/v1/runs/<run_id>/forward")
def _forward(w: World) -> None:
    _run_op(w, "forward", FB)


@route("POST", "/v1/runs/<run_id>/optim_step")
def _optim_step(w: World) -> None:
    _run_op(w, "optim_step", {"learning_rate": 1e-3})


@route("POST", "/v1/runs/<run_id>/save")
def _save(w: World) -> None:
    _run_op(w, "save", {"name": "by-walk"})


@route("POST", "/v1/runs/<run_id>/load")
def _load(w: World) -> None:
    # bob loads his own state into alice's run: her run is unknown to him
    with untouched(w):
        body = {"path": w.b_state}
        missing = w.post("bob", f"/v1/runs/{MISSING_RUN}/load", body)
        unknown(w.post("bob", f"/v1/runs/{w.a_run}/load", body), missing, w.a_run, MISSING_RUN)
    # bob loads alice's state into his own run: her checkpoint is unknown to him
    missing_path = f"{MISSING_RUN}/s1"
    with untouched(w, "bob", w.b_run):
        foreign = w.post("bob", f"/v1/runs/{w.b_run}/load", {"path": w.a_state})
        missing = w.post("bob", f"/v1/runs/{w.b_run}/load", {"path": missing_path})
        unknown(foreign, missing, w.a_state, missing_path)
    w.done("alice", w.post("alice", f"/v1/runs/{w.a_run}/load", {"path": w.a_state}))


@route("GET", "/v1/runs/<run_id>/metrics")
def _metrics(w: World) -> None:
    for params in ({}, {"format": "csv"}):
        missing = w.get("bob", f"/v1/runs/{MISSING_RUN}/metrics", params=params)
        foreign = w.get("bob", f"/v1/runs/{w.a_run}/metrics", params=params)
        unknown(foreign, missing, w.a_run, MISSING_RUN)
    for who in ("alice", "admin"):
        points = w.get(who, f"/v1/runs/{w.a_run}/metrics").json()["points"]
        assert {p["op"] for p in points} == {"forward_backward", "optim_step"}


@route("GET", "/v1/runs/<run_id>/operations")
def _operations(w: World) -> None:
    missing = w.get("bob", f"/v1/runs/{MISSING_RUN}/operations")
    unknown(w.get("bob", f"/v1/runs/{w.a_run}/operations"), missing, w.a_run, MISSING_RUN)
    for who in ("alice", "admin"):
        ops = w.get(who, f"/v1/runs/{w.a_run}/operations?limit=200").json()["operations"]
        assert w.a_future in {o["future_id"] for o in ops}


# -- futures ---------------------------------------------------------------------------------
def _future(w: World, prefix: str) -> None:
    missing_id = "fut_0123456789abcdef0123456789abcdef"
    missing = w.get("bob", f"{prefix}/{missing_id}")
    unknown(w.get("bob", f"{prefix}/{w.a_future}"), missing, w.a_future, missing_id)
    # a long-poll of another tenant's future answers at once, as for an unknown one
    foreign, took = elapsed(lambda: w.get("bob", f"{prefix}/{w.a_future}", params={"wait": 5}))
    assert foreign.status_code == 404 and took < 3
    for who in ("alice", "admin"):
        assert w.get(who, f"{prefix}/{w.a_future}").json()["status"] == "succeeded"
    assert w.get("default", f"{prefix}/{w.a_future}").status_code == 404


@route("GET", "/v1/futures/<future_id>")
def _get_future(w: World) -> None:
    _future(w, "/v1/futures")


@route("GET", "/v1/jobs/<future_id>")
def _get_job(w: World) -> None:
    _future(w, "/v1/jobs")


@route("POST", "/v1/futures/batch")
def _batch(w: World) -> None:
    missing_id = "fut_0123456789abcdef0123456789abcdef"
    foreign = w.post("bob", "/v1/futures/batch", {"future_ids": [w.b_future, w.a_future]})
    missing = w.post("bob", "/v1/futures/batch", {"future_ids": [w.b_future, missing_id]})
    unknown(foreign, missing, w.a_future, missing_id)
    assert w.post("bob", "/v1/futures/batch", {"future_ids": [w.b_future]}).status_code == 200
    assert w.post("alice", "/v1/futures/batch", {"future_ids": [w.a_future]}).status_code == 200
    both = w.post("admin", "/v1/futures/batch", {"future_ids": [w.a_future, w.b_future]})
    assert [f["status"] for f in both.json()["futures"]] == ["succeeded", "succeeded"]


# -- sampling --------------------------------------------------------------------------------
def _sampling(w: World, path: str, body: dict) -> None:
    missing_path = f"{MISSING_RUN}/smp"
    sources = [
        ("run_id", w.a_run, MISSING_RUN),
        ("checkpoint", w.a_sampler, missing_path),
        ("model_path", w.a_sampler, missing_path),
        ("checkpoint", w.a_state, missing_path),
    ]
    with untouched(w):
        for key, foreign_id, missing_id in sources:
            foreign = w.post("bob", path, {**body, key: foreign_id})
            unknown(foreign, w.post("bob", path, {**body, key: missing_id}), foreign_id, missing_id)
    for key, foreign_id, _ in sources[:2]:
        w.done("alice", w.post("alice", path, {**body, key: foreign_id}))


@route("POST", "/v1/sample")
def _sample(w: World) -> None:
    _sampling(w, "/v1/sample", {"prompt_tokens": TOKENS[:3], "max_tokens": 3})


@route("POST", "/v1/compute_logprobs")
def _logprobs(w: World) -> None:
    _sampling(w, "/v1/compute_logprobs", {"tokens": TOKENS})


# -- checkpoints -----------------------------------------------------------------------------
@route("GET", "/v1/checkpoints")
def _all_checkpoints(w: World) -> None:
    def paths(who: str) -> set[str]:
        listed = w.get(who, "/v1/checkpoints")
        assert listed.status_code == 200, listed.text
        return {c["path"] for c in listed.json()["checkpoints"]}

    alice, bob, admin = paths("alice"), paths("bob"), paths("admin")
    assert {w.a_state, w.a_sampler} <= alice and not any(p.startswith(w.b_run) for p in alice)
    assert w.b_state in bob and not any(p.startswith(w.a_run) for p in bob)
    assert {w.a_state, w.a_sampler, w.b_state} <= admin
    assert not any(p.startswith((w.a_run, w.b_run)) for p in paths("default"))


@route("GET", "/v1/runs/<run_id>/checkpoints")
def _run_checkpoints(w: World) -> None:
    missing = w.get("bob", f"/v1/runs/{MISSING_RUN}/checkpoints")
    foreign = w.get("bob", f"/v1/runs/{w.a_run}/checkpoints")
    unknown(foreign, missing, w.a_run, MISSING_RUN)
    for who in ("alice", "admin"):
        names = {
            c["name"] for c in w.get(who, f"/v1/runs/{w.a_run}/checkpoints").json()["checkpoints"]
        }
        assert {"s1", "smp"} <= names


def _one_checkpoint(w: World, suffix: str, method: str = "GET") -> None:
    send = w.get if method == "GET" else w.delete
    with untouched(w):
        for name in ("s1", "smp"):
            missing = send("bob", f"/v1/runs/{MISSING_RUN}/checkpoints/{name}{suffix}")
            foreign = send("bob", f"/v1/runs/{w.a_run}/checkpoints/{name}{suffix}")
            unknown(foreign, missing, w.a_run, MISSING_RUN)


@route("GET", "/v1/runs/<run_id>/checkpoints/<name>")
def _get_checkpoint(w: World) -> None:
    _one_checkpoint(w, "")
    for who in ("alice", "admin"):
        assert w.get(who, f"/v1/runs/{w.a_run}/checkpoints/s1").json()["path"] == w.a_state


@route("DELETE", "/v1/runs/<run_id>/checkpoints/<name>")
def _delete_checkpoint(w: World) -> None:
    _one_checkpoint(w, "", "DELETE")
    w.done("alice", w.post("alice", f"/v1/runs/{w.a_run}/save", {"name": "doomed"}))
    assert w.delete("bob", f"/v1/runs/{w.a_run}/checkpoints/doomed").status_code == 404
    assert (w.svc.checkpoints_dir / w.a_run / "doomed").is_dir()
    assert w.delete("alice", f"/v1/runs/{w.a_run}/checkpoints/doomed").status_code == 200
    assert not (w.svc.checkpoints_dir / w.a_run / "doomed").exists()


@route("GET", "/v1/runs/<run_id>/checkpoints/<name>/archive")
def _archive(w: World) -> None:
    _one_checkpoint(w, "/archive")
    for who in ("alice", "admin"):
        got = w.get(who, f"/v1/runs/{w.a_run}/checkpoints/smp/archive")
        assert got.status_code == 200 and got.headers["content-type"] == "application/gzip"
        with tarfile.open(fileobj=io.BytesIO(got.content), mode="r:gz") as tar:
            assert "smp/adapter_config.json" in tar.getnames()


# -- models (shared, but the list shows only the models of the caller's runs) ----------------
@route("GET", "/v1/models")
def _models(w: World) -> None:
    def names(who: str) -> set[str]:
        return {m["name"] for m in w.get(who, "/v1/models").json()["models"]}

    assert w.a_model in names("alice") and w.a_model in names("admin")
    assert w.a_model not in names("bob") and w.a_model not in names("default")
    assert {"tiny-gpt2", "tiny-llama"} <= names("bob")  # built-in models are everyone's


def _shared(w: World, send: Callable[[str], httpx.Response]) -> None:
    """A route with no tenant objects: every key gets the same answer; no key gets 401."""
    answers = [send(who) for who in ("alice", "bob", "admin")]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert answers[0].content == answers[1].content == answers[2].content
    assert send("nobody").status_code == 401


@route("POST", "/v1/tokenize")
def _tokenize(w: World) -> None:
    _shared(w, lambda who: w.post(who, "/v1/tokenize", {"text": "hello"}))


@route("POST", "/v1/detokenize")
def _detokenize(w: World) -> None:
    _shared(w, lambda who: w.post(who, "/v1/detokenize", {"tokens": TOKENS}))


@route("GET", "/v1/models/<path:name>/tokenizer/<filename>")
def _tokenizer_file(w: World) -> None:
    _shared(w, lambda who: w.get(who, "/v1/models/tiny-gpt2/tokenizer/tokenizer.json"))


@route("GET", "/v1/tokenizer/<filename>")
def _tokenizer_file_of(w: World) -> None:
    params = {"base_model": "tiny-gpt2"}
    _shared(w, lambda who: w.get(who, "/v1/tokenizer/tokenizer.json", params=params))


# -- open routes: no key needed, no tenant objects --------------------------------------------
def _open(w: World, path: str, status: int = 200) -> None:
    assert w.get("nobody", path).status_code == status


@route("GET", "/health")
def _health(w: World) -> None:
    _open(w, "/health")


@route("GET", "/openapi.json")
def _openapi(w: World) -> None:
    _open(w, "/openapi.json")


@route("GET", "/docs")
def _docs(w: World) -> None:
    _open(w, "/docs")


@route("GET", "/docs/assets/<path:filename>")
def _docs_assets(w: World) -> None:
    _open(w, "/docs/assets/swagger-ui.css")


@route("GET", "/")
def _index(w: World) -> None:
    _open(w, "/", 302)


# The console's pages hold no tenant data (their script reads the API with the user's key:
# tests/integration/test_console.py shows one tenant's console without the other's runs).
@route("GET", "/console")
def _console(w: World) -> None:
    _open(w, "/console")


@route("GET", "/console/")
def _console_slash(w: World) -> None:
    _open(w, "/console/")


@route("GET", "/console/runs/<run_id>")
def _console_run(w: World) -> None:
    page = w.get("nobody", f"/console/runs/{w.a_run}")
    assert page.status_code == 200 and w.a_run in page.text
    for who in ("nobody", "bob"):  # nothing of the run but its id, which the URL holds
        body = w.get(who, f"/console/runs/{w.a_run}").text
        assert w.a_model not in body and "tiny-gpt2" not in body


@route("GET", "/console/playground")
def _console_playground(w: World) -> None:
    _open(w, "/console/playground")


@route("GET", "/console/workers")
def _console_workers(w: World) -> None:
    _open(w, "/console/workers")


@route("GET", "/console/static/<path:filename>")
def _console_static(w: World) -> None:
    _open(w, "/console/static/console.js")


@route("GET", "/static/<path:filename>")
def _static(w: World) -> None:
    _open(w, "/static/nothing.txt", 404)  # Flask's default static route: nothing is there


# -- the walk --------------------------------------------------------------------------------
CASES.update(TINKER_CASES)  # /api/v1, Tinker's protocol
CASES.update(OPENAI_CASES)  # /openai/v1, OpenAI's API
ROUTES = app_routes()


def test_the_routes_walked_are_the_apps_routes() -> None:
    assert set(CASES) == set(ROUTES), "every route of the app needs a tenant case (and only those)"
    spec = create_app(Settings()).test_client().get("/openapi.json").get_json()
    documented = {
        (method.upper(), path.replace("{", "<").replace("}", ">"))
        for path, ops in spec["paths"].items()
        for method in ops
        if method in ("get", "post", "put", "patch", "delete")
    }
    plain = {(m, r.replace("<path:", "<")) for m, r in ROUTES}
    assert documented <= plain, documented - plain
    assert any(r.startswith("/v1/") for _, r in ROUTES) and len(ROUTES) >= 20


@pytest.mark.parametrize(("method", "rule"), ROUTES, ids=[f"{m} {r}" for m, r in ROUTES])
def test_route_keeps_tenants_apart(w: World, method: str, rule: str) -> None:
    case = CASES.get((method, rule))
    assert case is not None, f"no tenant case for {method} {rule}: add one to this module"
    case(w)
