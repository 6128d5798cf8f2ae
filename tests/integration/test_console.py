"""The web console in a real headless Chromium (Playwright driving the Debian ``chromium``).

Each page loads with no console error, a run's chart has one point per recorded step (and
grows as the run trains), the playground returns the completion ``/v1/sample`` gives, a
checkpoint is deleted only once confirmed, and with API keys on the console asks for one and
shows that tenant's runs only. Screenshots of every page go to ``artifacts/console/``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

import eztinker
from eztinker import types
from tests.conftest import REPO, Service, result_of
from tests.integration.tenant_world import start_tenant_stack

CHROMIUM = os.environ.get("EZTINKER_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO / "artifacts" / "console"
TOKENS = [5, 17, 42, 99, 7, 300, 12, 64]
STEPS = 3


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), (
        f"no Chromium at {CHROMIUM}: install it (`apt-get install -y chromium`, as .ci/run does) "
        "or point EZTINKER_CHROMIUM at one"
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots: {ARTIFACTS}")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


class Watched:
    """A page and every console error or uncaught exception it had."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.errors.append(f"{msg.text} ({msg.location.get('url')})")

    def shot(self, name: str) -> Path:
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture()
def watched(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield Watched(page)
    context.close()


def train(service: Service, steps: int, run_id: str | None = None) -> str:
    """Train a run (a new one unless ``run_id``) ``steps`` steps through the SDK; its id."""
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={"target_tokens": TOKENS[1:]},
    )
    with eztinker.ServiceClient(base_url=service.base_url) as sdk:
        client = (
            sdk.create_training_client(run_id)
            if run_id
            else sdk.create_lora_training_client("tiny-gpt2", rank=4, seed=7)
        )
        for _ in range(steps):
            client.forward_backward([datum], "cross_entropy")
            client.optim_step(types.AdamParams(learning_rate=5e-3))
        client.save_state(f"after-{steps}").result(timeout=120)
        return client.model_id


@pytest.fixture(scope="module")
def trained(service: Service) -> str:
    return train(service, STEPS)


def chart_points(page: Page, metric: str, op: str = "forward_backward") -> int:
    holder = page.locator(f'figure.chart[data-metric="{metric}"][data-op="{op}"]')
    expect(holder).to_have_count(1)
    return int(holder.get_attribute("data-points") or -1)


def test_each_page_loads_without_console_errors(
    service: Service, trained: str, watched: Watched
) -> None:
    page = watched.page
    page.goto(service.base_url + "/")  # / leads to the console
    assert page.url.endswith("/console")
    expect(page.locator(f'#runs tr[data-run-id="{trained}"]')).to_be_visible()
    row = page.locator(f'#runs tr[data-run-id="{trained}"]').inner_text()
    assert "tiny-gpt2" in row and "ready" in row and str(STEPS) in row
    watched.shot("runs")

    page.click(f'#runs a:text("{trained}")')
    expect(page.locator('figure.chart[data-metric="loss:sum"] canvas')).to_be_visible()
    expect(page.locator('#checkpoints tr[data-checkpoint="after-3"]')).to_be_visible()
    expect(page.locator("#operations tbody tr").first).to_contain_text("save")
    watched.shot("run")

    page.click('nav a:text("Playground")')
    expect(page.locator(f'#source option[value="run:{trained}"]')).to_have_count(1)
    watched.shot("playground")

    page.click('nav a:text("Workers")')
    expect(page.locator("article.worker")).to_have_count(1)
    worker = page.locator("article.worker").inner_text()
    assert "cpu" in worker and trained in worker and "queue depths" in worker.lower()
    expect(page.locator("#flower-link")).to_have_attribute("href", re.compile(r":5555/$"))
    watched.shot("workers")
    assert watched.errors == []


def test_the_chart_has_one_point_per_step_and_follows_training(
    service: Service, trained: str, watched: Watched, http: httpx.Client
) -> None:
    page = watched.page
    page.goto(f"{service.base_url}/console/runs/{trained}")
    expect(page.locator('figure.chart[data-metric="loss:sum"]')).to_have_attribute(
        "data-points", str(STEPS)
    )
    points = http.get(f"/v1/runs/{trained}/metrics").json()["points"]
    losses = [p["metrics"]["loss:sum"] for p in points if p["op"] == "forward_backward"]
    assert chart_points(page, "grad_norm", "optim_step") == STEPS
    # hovering a point shows its value in the legend
    canvas = page.locator('figure.chart[data-metric="loss:sum"] .u-over')
    box = canvas.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + 2, box["y"] + box["height"] / 2)
    legend = page.locator('figure.chart[data-metric="loss:sum"] .u-legend .u-series').nth(1)
    expect(legend).to_contain_text(f"{losses[0]:.3f}"[:4])
    train(service, 2, trained)  # the page follows: two more points
    expect(page.locator('figure.chart[data-metric="loss:sum"]')).to_have_attribute(
        "data-points", str(STEPS + 2), timeout=20_000
    )
    # drag over the first half zooms in (the x axis ends before step 4); a double-click resets
    loss_chart = page.locator('figure.chart[data-metric="loss:sum"]')
    expect(loss_chart).to_have_attribute("data-x-max", "4")
    box = canvas.bounding_box()
    assert box is not None
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + 1, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.45, y, steps=8)
    page.mouse.up()
    expect(loss_chart).not_to_have_attribute("data-x-max", "4")
    assert float(loss_chart.get_attribute("data-x-max") or 9) < 2.5
    canvas.dblclick()
    expect(loss_chart).to_have_attribute("data-x-max", "4")
    watched.shot("run-after-more-steps")
    assert watched.errors == []


def test_the_playground_returns_the_completion_sample_gives(
    service: Service, trained: str, watched: Watched, http: httpx.Client
) -> None:
    page = watched.page
    page.goto(f"{service.base_url}/console/playground?run={trained}")
    expect(page.locator("#source")).to_have_value(f"run:{trained}")
    page.fill("#prompt", "The river")
    page.fill("#max_tokens", "8")
    page.fill("#temperature", "0.9")
    page.fill("#seed", "42")
    page.click("#sample-go")
    expect(page.locator("#sample-state")).to_contain_text("done")
    sample = page.locator('article.sample[data-sample="0"]')
    expect(sample).to_be_visible()
    same = {
        "run_id": trained,
        "prompt": "The river",
        "max_tokens": 8,
        "temperature": 0.9,
        "top_p": 1,
        "num_samples": 1,
        "seed": 42,
    }
    expected: dict[str, Any] = result_of(http, http.post("/v1/sample", json=same))["sequences"][0]
    assert sample.locator(".generated").inner_text() == expected["text"]
    chips = sample.locator(".tok")
    expect(chips).to_have_count(len(expected["tokens"]))
    first = chips.first.get_attribute("title") or ""
    assert f"token {expected['tokens'][0]} · logprob {expected['logprobs'][0]:.4f}" in first
    watched.shot("playground-completion")
    # a checkpoint of the run, greedy
    path = f"{trained}/after-{STEPS}"
    page.select_option("#source", f"checkpoint:{path}")
    page.fill("#temperature", "0")
    page.click("#sample-go")
    expect(page.locator("#sample-state")).to_contain_text("done")
    greedy = {**same, "run_id": None, "checkpoint": path, "temperature": 0}
    expected = result_of(http, http.post("/v1/sample", json=greedy))["sequences"][0]
    expect(sample.locator(".generated")).to_have_text(expected["text"])
    assert watched.errors == []


def test_the_playground_asks_for_token_texts_once_and_drops_old_samples(
    service: Service, watched: Watched, http: httpx.Client
) -> None:
    """The per-token view's texts come in one request per sampling (it sent one request per
    distinct token: 1,749 for 8 x 512 tokens), and a new request's samples never sit beside an
    error as if they were its answer."""
    page = watched.page
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if r.url.endswith("/v1/detokenize") else None)
    page.goto(f"{service.base_url}/console/playground")
    page.select_option("#source", "base:tiny-gpt2")
    page.fill("#max_tokens", "40")
    page.fill("#temperature", "1.5")
    page.fill("#num_samples", "4")
    page.fill("#seed", "9")
    page.click("#sample-go")
    expect(page.locator("#sample-state")).to_contain_text("done")
    expect(page.locator("article.sample")).to_have_count(4)
    assert len(asked) == 1, len(asked)
    body = {"base_model": "tiny-gpt2", "prompt": "Once upon a time,", "max_tokens": 40,
            "temperature": 1.5, "top_p": 1, "num_samples": 4, "seed": 9}  # fmt: skip
    expected = result_of(http, http.post("/v1/sample", json=body))["sequences"]
    for i, seq in enumerate(expected):
        chips = page.locator(f'article.sample[data-sample="{i}"] .tok-text').all_inner_texts()
        own = [
            http.post("/v1/detokenize", json={"base_model": "tiny-gpt2", "tokens": [t]}).json()
            for t in seq["tokens"]
        ]
        assert chips == [o["text"].replace("\n", "⏎") or "·" for o in own]
    # the same token texts again: nothing more to ask
    page.click("#sample-go")
    expect(page.locator("#sample-state")).to_contain_text("done")
    assert len(asked) == 1, len(asked)
    # a request refused: its error, and no samples of an earlier request
    page.fill("#max_tokens", "100000")
    page.click("#sample-go")
    expect(page.locator("#error")).to_contain_text("max_tokens")
    expect(page.locator("article.sample")).to_have_count(0)


def test_after_loading_an_earlier_state_the_chart_is_the_runs_own(
    service: Service, watched: Watched, http: httpx.Client
) -> None:
    """Steps made again after a load of an earlier state replace the abandoned ones in the
    chart (they were added to them: the loss at step 2 doubled)."""
    from tests.integration.test_metrics_history import rewound_run

    run_id, now = rewound_run(http)
    page = watched.page
    page.goto(f"{service.base_url}/console/runs/{run_id}")
    holder = page.locator('figure.chart[data-metric="loss:sum"][data-op="forward_backward"]')
    expect(holder).to_have_attribute("data-points", "4")
    shown = json.loads(holder.get_attribute("data-values") or "null")
    assert shown == pytest.approx([now[i] for i in range(4)])


def test_a_checkpoint_is_deleted_only_once_confirmed(
    service: Service, trained: str, watched: Watched, http: httpx.Client
) -> None:
    result_of(http, http.post(f"/v1/runs/{trained}/save", json={"name": "doomed"}))
    page = watched.page
    page.goto(f"{service.base_url}/console/runs/{trained}")
    row = page.locator('#checkpoints tr[data-checkpoint="doomed"]')
    row.locator('button:text("delete")').click()
    dialog = page.locator("#confirm-delete")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text(f"{trained}/doomed")
    watched.shot("run-delete-confirmation")
    page.click("#confirm-cancel")
    expect(dialog).to_be_hidden()
    assert http.get(f"/v1/runs/{trained}/checkpoints/doomed").status_code == 200
    row.locator('button:text("delete")').click()
    page.click("#confirm-ok")
    expect(row).to_have_count(0)
    assert http.get(f"/v1/runs/{trained}/checkpoints/doomed").status_code == 404
    # a download is the checkpoint's archive
    with page.expect_download() as got:
        page.locator('#checkpoints tr[data-checkpoint="after-3"] button:text("download")').click()
    assert got.value.suggested_filename == f"{trained}-after-3.tar.gz"
    assert watched.errors == []


def test_a_run_that_is_gone_says_so_and_stops_polling(
    service: Service, watched: Watched, http: httpx.Client
) -> None:
    """A deleted run (or a typo, or another tenant's run): the page says there is no such run,
    offers nothing for it, and stops asking for it (it polled its three 404s every 2 s)."""
    page = watched.page
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if "/v1/runs/" in r.url else None)
    page.goto(f"{service.base_url}/console/runs/run_nosuchrun")
    gone = page.locator("#run-gone")
    expect(gone).to_be_visible()
    expect(gone).to_contain_text("run_nosuchrun")
    expect(page.locator("#run-sections")).to_be_hidden()
    expect(page.locator("text=loading… >> visible=true")).to_have_count(0)
    watched.shot("run-gone")
    before = len(asked)
    page.wait_for_timeout(5000)  # more than two poll periods
    assert len(asked) == before, asked[before:]
    # a run deleted while its page is open
    run_id = train(service, 1)
    page.goto(f"{service.base_url}/console/runs/{run_id}")
    expect(page.locator('figure.chart[data-metric="loss:sum"] canvas')).to_be_visible()
    result_of(http, http.delete(f"/v1/runs/{run_id}"))
    expect(gone).to_be_visible(timeout=15_000)
    expect(page.locator("#run-sections")).to_be_hidden()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Any]:
    svc = start_tenant_stack(tmp_path_factory.mktemp("console-keys"), model_cache, {})
    runs = {}
    for who, key in (("alice", "ka"), ("bob", "kb")):
        with httpx.Client(
            base_url=svc.base_url, timeout=60, headers={"Authorization": f"Bearer {key}"}
        ) as http:
            created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 2})
            result_of(http, created)
            runs[who] = created.json()["run_id"]
    yield svc, runs
    svc.stop()


def test_with_keys_on_the_console_asks_for_one_and_shows_that_tenants_runs(
    keyed: Any, watched: Watched
) -> None:
    svc, runs = keyed
    page = watched.page
    page.goto(svc.base_url + "/console")
    expect(page.locator("#key-form-box")).to_be_visible()
    expect(page.locator("#main")).to_be_hidden()
    watched.shot("key-form")
    page.fill("#key-input", "ka")
    page.click('#key-form button[type="submit"]')
    expect(page.locator(f'#runs tr[data-run-id="{runs["alice"]}"]')).to_be_visible()
    expect(page.locator("#runs tbody tr")).to_have_count(1)  # bob's run is not there
    expect(page.locator("#key-label")).to_have_text("key set")  # a short key is not shown
    watched.shot("runs-as-alice")
    assert watched.errors == []
    # bob's run page, with alice's key: unknown, as a run that never existed
    page.goto(f"{svc.base_url}/console/runs/{runs['bob']}")
    expect(page.locator("#run-gone")).to_contain_text(runs["bob"])
    expect(page.locator("#run-sections")).to_be_hidden()
    # the playground offers alice's run, not bob's
    page.goto(svc.base_url + "/console/playground")
    expect(page.locator(f'#source option[value="run:{runs["alice"]}"]')).to_have_count(1)
    expect(page.locator(f'#source option[value="run:{runs["bob"]}"]')).to_have_count(0)
    # an admin key sees both tenants' runs, each with its tenant
    page.click("#key-forget")
    page.fill("#key-input", "kroot")
    page.click('#key-form button[type="submit"]')
    expect(page.locator("#key-label")).to_have_text("key set")
    page.goto(svc.base_url + "/console")
    for who, run_id in runs.items():
        expect(page.locator(f'#runs tr[data-run-id="{run_id}"]')).to_contain_text(who)
    expect(page.locator("#runs th.tenant-col")).to_be_visible()
    watched.shot("runs-as-admin")
    # a wrong key is refused and asked for again
    page.click("#key-forget")
    page.fill("#key-input", "not-a-key")
    page.click('#key-form button[type="submit"]')
    expect(page.locator("#key-error")).to_contain_text("refused")
    expect(page.locator("#key-label")).to_have_text("key refused")  # not "key set"


def test_artifacts_are_ignored_by_git() -> None:
    found = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", "artifacts/console/runs.png"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert found.stdout.strip() == "artifacts/console/runs.png"


def test_the_wheel_ships_the_console(tmp_path: Path) -> None:
    """Offline means packaged: templates, script, stylesheet and uPlot are in the wheel."""
    subprocess.run(["uv", "build", "--wheel", "--quiet", "-o", str(tmp_path)], cwd=REPO, check=True)
    (wheel,) = tmp_path.glob("eztinker-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    console = "eztinker_web/console/"
    for name in (
        "templates/console/base.html",
        "templates/console/run.html",
        "static/console.js",
        "static/console.css",
        "static/vendor/uPlot.iife.min.js",
        "static/vendor/uPlot.min.css",
        "static/vendor/uPlot.LICENSE",
    ):
        assert console + name in names, name
