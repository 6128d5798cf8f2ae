// EZTinker console: every page reads the JSON API (/v1, /health) with the user's API key.
// No framework; charts by uPlot (vendored). The page to set up is <body data-page>.
"use strict";

const KEY_STORE = "eztinker.apiKey";
const POLL_MS = 2000;
const AUTH_ON = document.body.dataset.auth === "on";

// -- small helpers ---------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}
const $ = (sel) => document.querySelector(sel);
const fmtNum = (v, digits = 4) =>
  v === null || v === undefined ? "–" : Number(v).toLocaleString(undefined, { maximumSignificantDigits: digits });
const fmtInt = (v) => (v === null || v === undefined ? "–" : Number(v).toLocaleString());
const fmtTime = (s) => (s ? new Date(s * 1000).toLocaleString() : "–");
function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function badge(status) {
  return el("span", { class: `badge s-${status}`, text: status });
}
function fillBody(table, rows, emptyText, cols) {
  const body = table.querySelector("tbody");
  body.replaceChildren(...(rows.length ? rows : [
    el("tr", { class: "empty" }, el("td", { colspan: cols, text: emptyText })),
  ]));
}

// -- the API, with the key ------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}
const apiKey = () => localStorage.getItem(KEY_STORE) || "";

async function api(path, { method = "GET", json, raw = false } = {}) {
  const headers = {};
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(path, { method, headers, body });
  if (!response.ok) {
    let detail = null;
    try { detail = await response.json(); } catch { /* not JSON */ }
    if (response.status === 401) askForKey("That key was refused: give a valid one.");
    throw new ApiError(response.status, detail);
  }
  return raw ? response : response.json();
}

async function waitFuture(futureId, onTick) {
  for (;;) {
    const body = await api(`/v1/futures/${encodeURIComponent(futureId)}?wait=10`);
    if (body.status === "succeeded" || body.status === "failed") return body;
    if (onTick) onTick(body);
  }
}

async function download(path, filename) {
  const response = await api(path, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  const a = el("a", { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function showError(err) {
  const box = $("#error");
  if (!err) { box.hidden = true; return; }
  if (err instanceof ApiError && err.status === 401) return;  // the key form says it
  box.textContent = err.message || String(err);
  box.hidden = false;
}

// Poll ``fn`` every POLL_MS while the page is visible; errors show in the banner. The
// function returned stops it (also from inside ``fn``).
function poll(fn) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    try { await fn(); showError(null); } catch (err) { showError(err); }
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

// -- the key bar ---------------------------------------------------------------------------
function askForKey(message) {
  $("#key-form-box").hidden = false;
  $("#main").hidden = true;
  const error = $("#key-error");
  error.hidden = !message;
  error.textContent = message || "";
  if (message && apiKey()) $("#key-label").textContent = "key refused";  // not "key set"
}

// False when the page must wait for a key (keys are on and none is kept).
function setUpKey(required) {
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(KEY_STORE, $("#key-input").value.trim());
    location.reload();
  });
  $("#key-forget").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORE);
    location.reload();
  });
  if (!AUTH_ON) return true;
  const key = apiKey();
  if (!key) {
    if (required) askForKey("");
    return !required;
  }
  $("#key-status").hidden = false;
  // Which key (its last characters, for a long one), never enough of it to use.
  $("#key-label").textContent = key.length >= 16 ? `key …${key.slice(-4)}` : "key set";
  return true;
}

// -- runs -----------------------------------------------------------------------------------
function runsPage() {
  const table = $("#runs");
  poll(async () => {
    const { runs } = await api("/v1/runs");
    const tenants = new Set(runs.map((r) => r.tenant));
    const showTenant = tenants.size > 1;
    table.querySelectorAll(".tenant-col").forEach((c) => { c.hidden = !showTenant; });
    runs.sort((a, b) => b.created_at - a.created_at);
    const rows = runs.map((r) => el("tr", { "data-run-id": r.run_id },
      el("td", {}, el("a", { href: `/console/runs/${encodeURIComponent(r.run_id)}`, text: r.run_id })),
      el("td", { text: r.base_model }),
      el("td", { text: r.worker }),
      el("td", {}, badge(r.status)),
      el("td", { class: "num", text: fmtInt(r.step) }),
      el("td", { class: "num", text: fmtInt(r.tokens_trained) }),
      el("td", { class: "num", text: fmtNum(r.last_loss) }),
      el("td", { text: fmtTime(r.created_at) }),
      el("td", { class: "tenant-col", hidden: !showTenant, text: r.tenant }),
    ));
    fillBody(table, rows, "No runs yet: create one with the SDK, the CLI or POST /v1/runs.", 9);
  });
}

// -- one run --------------------------------------------------------------------------------
const STEP_INCREMENTS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 1e6];
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2"];

// The points of the run as it now stands (eztinker.history.current_branch): after a load
// of an earlier state the run makes those steps again, and an op that starts below the step
// the run had reached drops the earlier points from that step on.
function currentBranch(points) {
  let kept = [];
  let at = 0;
  for (const p of [...points].sort((a, b) => a.seq_id - b.seq_id)) {
    const start = p.op === "optim_step" ? p.step - 1 : p.step;
    if (start < at) kept = kept.filter((q) => (q.op === "optim_step" ? q.step <= start : q.step < start));
    kept.push(p);
    at = p.step;
  }
  return kept;
}

// Per step: a forward_backward metric summed over the step's calls when it is a sum
// (``name:sum``), else averaged; an optim_step metric as it is.
function seriesByStep(points, op, name) {
  const byStep = new Map();
  for (const p of currentBranch(points)) {
    if (p.op !== op || !(name in p.metrics)) continue;
    const s = byStep.get(p.step) || { total: 0, n: 0 };
    s.total += p.metrics[name];
    s.n += 1;
    byStep.set(p.step, s);
  }
  const steps = [...byStep.keys()].sort((a, b) => a - b);
  const values = steps.map((k) => {
    const s = byStep.get(k);
    return name.endsWith(":sum") ? s.total : s.total / s.n;
  });
  return [steps, values];
}

function metricNames(points) {
  const names = new Map();  // "op|name" -> [op, name]
  for (const p of points) {
    for (const name of Object.keys(p.metrics)) {
      if (p.op === "optim_step" && name === "step") continue;  // it is the x axis
      names.set(`${p.op}|${name}`, [p.op, name]);
    }
  }
  const order = (x) => (x[1] === "loss:sum" ? 0 : x[0] === "forward_backward" ? 1 : 2);
  return [...names.values()].sort((a, b) => order(a) - order(b) || a[1].localeCompare(b[1]));
}

class Charts {
  constructor(box) {
    this.box = box;
    this.charts = new Map();
  }

  update(points) {
    const names = metricNames(points);
    $("#charts-empty").hidden = names.length > 0;
    names.forEach(([op, name], i) => {
      const id = `${op}|${name}`;
      const data = seriesByStep(points, op, name);
      let chart = this.charts.get(id);
      if (!chart) {
        const holder = el("figure", { class: "chart", "data-metric": name, "data-op": op },
          el("figcaption", {}, el("strong", { text: name }), ` · ${op}`));
        this.box.append(holder);
        const plot = new uPlot({
          width: Math.max(320, holder.clientWidth - 8),
          height: 220,
          scales: { x: { time: false } },
          // whole steps only on the x axis (uPlot picks among these increments)
          axes: [{ label: "step", incrs: STEP_INCREMENTS }, { size: 60 }],
          series: [
            { label: "step" },
            { label: name, stroke: COLORS[i % COLORS.length], width: 2, points: { show: true, size: 5 } },
          ],
          cursor: { drag: { x: true, y: true, uni: 20 } },
          hooks: {
            // the x range shown (after a zoom), readable from the page: data-x-min/max
            setScale: [(u, key) => {
              if (key !== "x") return;
              holder.dataset.xMin = String(u.scales.x.min);
              holder.dataset.xMax = String(u.scales.x.max);
            }],
          },
        }, data, holder);
        chart = { holder, plot };
        this.charts.set(id, chart);
      } else {
        chart.plot.setData(data);
      }
      chart.holder.dataset.points = String(data[0].length);
      chart.holder.dataset.values = JSON.stringify(data[1]);
    });
  }

  resize() {
    for (const { holder, plot } of this.charts.values()) {
      plot.setSize({ width: Math.max(320, holder.clientWidth - 8), height: 220 });
    }
  }
}

function runPage() {
  const runId = document.body.dataset.runId;
  const base = `/v1/runs/${encodeURIComponent(runId)}`;
  const charts = new Charts($("#charts"));
  window.addEventListener("resize", () => charts.resize());
  const points = [];
  let after = 0;
  let pending = null;  // the checkpoint waiting for its delete confirmation
  const dialog = $("#confirm-delete");

  dialog.addEventListener("close", async () => {
    const checkpoint = pending;
    pending = null;
    if (dialog.returnValue !== "delete" || !checkpoint) return;
    try {
      await api(`${base}/checkpoints/${encodeURIComponent(checkpoint.name)}`, { method: "DELETE" });
      await showRun();
    } catch (err) { showError(err); }
  });
  $("#metrics-csv").addEventListener("click", () =>
    download(`${base}/metrics?format=csv`, `${runId}-metrics.csv`).catch(showError));

  async function showRun() {
    const run = await api(base);
    $("#run-status").replaceChildren(badge(run.status));
    const facts = [
      ["base model", run.base_model], ["worker", run.worker], ["step", fmtInt(run.step)],
      ["tokens trained", fmtInt(run.tokens_trained)], ["last loss", fmtNum(run.last_loss)],
      ["LoRA", `rank ${run.lora.rank}`], ["created", fmtTime(run.created_at)],
      ["last seq_id", fmtInt(run.last_seq_id)],
    ];
    if (run.tenant) facts.push(["tenant", run.tenant]);
    if (run.error) facts.push(["error", run.error]);
    $("#run-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
    const rows = run.checkpoints.map((c) => el("tr", { "data-checkpoint": c.name },
      el("td", {}, el("code", { text: c.name })),
      el("td", { text: c.kind }),
      el("td", { class: "num", text: fmtInt(c.step) }),
      el("td", { class: "num", text: fmtBytes(c.size_bytes) }),
      el("td", { text: fmtTime(c.created_at) }),
      el("td", { class: "row-actions" },
        el("button", {
          type: "button", class: "link", text: "download",
          onclick: () => download(`${base}/checkpoints/${encodeURIComponent(c.name)}/archive`,
            `${runId}-${c.name}.tar.gz`).catch(showError),
        }),
        el("button", {
          type: "button", class: "link danger", text: "delete",
          onclick: () => {
            pending = c;
            $("#confirm-name").textContent = c.path;
            dialog.returnValue = "";
            dialog.showModal();
          },
        }),
        el("a", { href: `/console/playground?checkpoint=${encodeURIComponent(c.path)}`, text: "sample" }),
      ),
    ));
    fillBody($("#checkpoints"), rows, "No checkpoints: save one with save_state or POST …/save.", 6);
  }

  async function showMetrics() {
    const body = await api(`${base}/metrics?after=${after}`);
    if (body.points.length || !points.length) {
      points.push(...body.points);
      if (points.length) after = points[points.length - 1].seq_id;
      charts.update(points);
    }
  }

  async function showOperations() {
    const { operations } = await api(`${base}/operations?limit=25`);
    const rows = operations.map((o) => el("tr", {},
      el("td", { class: "num", text: o.seq_id }),
      el("td", { text: o.op }),
      el("td", {}, badge(o.status)),
      el("td", { text: o.worker || "–" }),
      el("td", { class: "num", text: o.timing ? fmtNum(o.timing.queued_ms, 3) : "–" }),
      el("td", { class: "num", text: o.timing ? fmtNum(o.timing.run_ms, 3) : "–" }),
      el("td", { text: fmtTime(o.submitted_at) }),
      el("td", { class: "error-cell", text: o.error ? `${o.error.code}: ${o.error.message}` : "" }),
    ));
    fillBody($("#operations"), rows, "No operations yet.", 8);
  }

  // a run that is not there (deleted, mistyped, another tenant's) is said so, once
  function runGone() {
    $("#run-status").replaceChildren(badge("not found"));
    $("#run-sections").hidden = true;
    $("#run-gone").hidden = false;
  }

  const stop = poll(async () => {
    try {
      await showRun();
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 404)) throw err;
      stop();
      runGone();
      return;
    }
    await Promise.all([showMetrics(), showOperations()]);
  });
}

// -- the playground ---------------------------------------------------------------------------
async function playgroundPage() {
  const select = $("#source");
  const params = new URLSearchParams(location.search);
  const [models, runs, checkpoints] = await Promise.all([
    api("/v1/models"), api("/v1/runs"), api("/v1/checkpoints"),
  ]);
  const baseOf = new Map();
  const group = (label, items) => el("optgroup", { label }, ...items);
  const option = (value, text, baseModel) => { baseOf.set(value, baseModel); return el("option", { value, text }); };
  select.replaceChildren(
    group("Base models", models.models.map((m) => option(`base:${m.name}`, m.name, m.name))),
    group("Runs (live weights)", runs.runs.filter((r) => r.status !== "failed").map((r) =>
      option(`run:${r.run_id}`, `${r.run_id} · ${r.base_model} · step ${r.step}`, r.base_model))),
    group("Checkpoints", checkpoints.checkpoints.map((c) =>
      option(`checkpoint:${c.path}`, `${c.path} · ${c.kind} · step ${c.step}`, c.base_model))),
  );
  const wanted = params.get("run") ? `run:${params.get("run")}`
    : params.get("checkpoint") ? `checkpoint:${params.get("checkpoint")}` : null;
  if (wanted && baseOf.has(wanted)) select.value = wanted;

  $("#sample-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const source = select.value;
    const [kind, ...rest] = source.split(":");
    const id = rest.join(":");
    const body = {
      prompt: $("#prompt").value,
      max_tokens: Number($("#max_tokens").value),
      temperature: Number($("#temperature").value),
      top_p: Number($("#top_p").value),
      num_samples: Number($("#num_samples").value),
    };
    body[{ base: "base_model", run: "run_id", checkpoint: "checkpoint" }[kind]] = id;
    if ($("#seed").value !== "") body.seed = Number($("#seed").value);
    if ($("#stop").value !== "") body.stop = [$("#stop").value];
    const state = $("#sample-state");
    const go = $("#sample-go");
    go.disabled = true;
    state.textContent = "queued…";
    $("#samples").replaceChildren();  // an earlier request's samples are not this one's answer
    showError(null);
    try {
      const sent = await api("/v1/sample", { method: "POST", json: body });
      const done = await waitFuture(sent.future_id, (f) => {
        const p = f.progress || {};
        state.textContent = p.phase === "decode" ? `decoding ${p.tokens_done ?? 0}/${p.tokens_total ?? "?"}` : (p.phase || f.status);
      });
      if (done.status === "failed") throw new Error(`${done.error.code}: ${done.error.message}`);
      const ms = done.timing ? ` in ${fmtNum(done.timing.queued_ms + done.timing.run_ms, 3)} ms` : "";
      state.textContent = `done${ms}`;
      await showSamples(done.result, body.prompt, baseOf.get(source));
    } catch (err) {
      state.textContent = "";
      showError(err);
    } finally {
      go.disabled = false;
    }
  });
}

// Each token's own text, for the per-token view: the distinct tokens not seen before, in one
// request per sampling (``token_texts``), kept.
const tokenTexts = new Map();
async function loadTokenTexts(baseModel, tokens) {
  const key = (t) => `${baseModel}\u0000${t}`;
  const missing = [...new Set(tokens)].filter((t) => !tokenTexts.has(key(t)));
  if (missing.length) {
    const got = await api("/v1/detokenize", {
      method: "POST", json: { base_model: baseModel, tokens: missing, token_texts: true },
    });
    for (const t of missing) tokenTexts.set(key(t), got.token_texts[String(t)]);
  }
  return (t) => tokenTexts.get(key(t));
}

async function showSamples(result, prompt, baseModel) {
  const out = $("#samples");
  const cards = [];
  const textOf = await loadTokenTexts(baseModel, result.sequences.flatMap((s) => s.tokens));
  for (const [i, seq] of result.sequences.entries()) {
    const pieces = seq.tokens.map(textOf);
    const total = seq.logprobs.reduce((a, b) => a + b, 0);
    cards.push(el("article", { class: "card sample", "data-sample": i },
      el("h2", {}, `Sample ${i + 1} `, el("span", { class: "hint",
        text: `${seq.tokens.length} tokens · stop: ${seq.stop_reason} · sum logprob ${fmtNum(total)}` })),
      el("p", { class: "completion" }, el("span", { class: "prompt", text: prompt }),
        el("span", { class: "generated", text: seq.text ?? pieces.join("") })),
      el("div", { class: "tokens" }, ...seq.tokens.map((t, j) => {
        const lp = seq.logprobs[j];
        const prob = Math.exp(lp);
        return el("span", {
          class: "tok", title: `token ${t} · logprob ${lp.toFixed(4)} · p ${prob.toFixed(3)}`,
          style: `--p:${prob.toFixed(3)}`,
        }, el("span", { class: "tok-text", text: pieces[j].replace(/\n/g, "⏎") || "·" }),
        el("span", { class: "tok-lp", text: lp.toFixed(2) }));
      })),
    ));
  }
  out.replaceChildren(...cards);
}

// -- workers ----------------------------------------------------------------------------------
function workersPage() {
  poll(async () => {
    // /health answers 503 with the same body when no worker is live: show it all the same.
    const response = await fetch("/health");
    const health = await response.json();
    $("#health-facts").replaceChildren(
      el("dt", { text: "status" }), el("dd", {}, badge(health.status)),
      el("dt", { text: "broker" }), el("dd", {
        text: health.broker.ok ? `ok · ${fmtNum(health.broker.latency_ms, 3)} ms` : "unreachable" }),
      el("dt", { text: "runs" }), el("dd", { text: fmtInt(health.runs) }),
      ...(health.message ? [el("dt", { text: "note" }), el("dd", { text: health.message })] : []),
    );
    const cards = health.workers.map((w) => {
      const mem = w.memory || {};
      const memRows = [
        ["base weights", mem.base_params_bytes], ["adapters", mem.adapter_bytes],
        ["optimizer state", mem.optimizer_bytes], ["CUDA allocated", mem.cuda_allocated_bytes],
        ["CUDA reserved", mem.cuda_reserved_bytes], ["CUDA peak", mem.cuda_max_allocated_bytes],
      ].filter(([, v]) => v !== undefined);
      return el("article", { class: "card worker", "data-worker": w.name },
        el("h2", {}, w.name, " ", el("span", { class: "hint", text: `${w.device} · ${w.hostname} · pid ${w.pid}` })),
        el("div", { class: "cols" },
          el("dl", { class: "facts" },
            el("dt", { text: "heartbeat" }), el("dd", { text: `${fmtNum(w.last_heartbeat_s, 2)} s ago` }),
            ...memRows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: fmtBytes(v) })]),
          ),
          el("div", {},
            el("h3", { text: `runs held (${w.runs.length})` }),
            el("ul", { class: "plain" }, ...(w.runs.length ? w.runs.map((r) =>
              el("li", {}, el("a", { href: `/console/runs/${encodeURIComponent(r)}`, text: r })))
              : [el("li", { class: "hint", text: "none" })])),
          ),
          el("div", {},
            el("h3", { text: "queue depths" }),
            el("table", { class: "grid small" }, el("tbody", {}, ...Object.entries(w.queue_depths).map(([q, n]) =>
              el("tr", {}, el("td", {}, el("code", { text: q })), el("td", { class: "num", text: fmtInt(n) }))))),
          ),
        ),
      );
    });
    const starting = (health.starting || []).map((s) => el("article", { class: "card worker" },
      el("h2", {}, s.name, " ", el("span", { class: "hint", text: `starting for ${s.for_s} s` }))));
    const all = [...cards, ...starting];
    $("#workers").replaceChildren(...(all.length ? all : [el("p", { class: "empty", text: "No worker." })]));
  });
}

// -- start ------------------------------------------------------------------------------------
const PAGES = { runs: runsPage, run: runPage, playground: playgroundPage, workers: workersPage };
(function start() {
  const page = document.body.dataset.page;
  document.querySelectorAll(`[data-nav="${page === "run" ? "runs" : page}"]`)
    .forEach((a) => a.classList.add("current"));
  if (!setUpKey(page !== "workers")) return;  // nothing to show without a key (/health is open)
  Promise.resolve(PAGES[page]()).catch(showError);
})();
