// The rmdistill dashboard: plain script over the service's own REST API, with the same bearer token.
// Views (by the URL's fragment): #/jobs, #/jobs/<id>, #/policies. A token may arrive as #token=<t>: it is kept in
// this tab's sessionStorage and removed from the address bar at once.
"use strict";

const STAGES = ["data", "generate", "ensemble", "score", "distill", "evaluate"];
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 2500;
const IDLE_POLL_MS = 5000;
const TOKEN_KEY = "rmdistill-token";
const view = document.getElementById("view");
let timer = null;
let authRequired = true;

// ------------------------------------------------------------------------------------------------------ helpers
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) el.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

const fmt = (value, digits = 3) =>
  value === null || value === undefined ? "—" : typeof value === "number" ? Number(value).toFixed(digits) : String(value);
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "—");
function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  const s = Math.round(seconds);
  return s < 60 ? `${s} s` : s < 3600 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${(s / 3600).toFixed(1)} h`;
}
const badge = (state) => h("span", { class: `badge ${state}` }, state);

class Unauthorized extends Error {}

function headers(extra = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}`, ...extra } : extra;
}

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (response.status === 401) throw new Unauthorized();
  if (!response.ok) {
    let message = `${response.status}`;
    try {
      const body = await response.json();
      message = body.error?.message || message;
    } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}
const getJSON = async (path) => (await call(path)).json();
async function blobURL(path) {
  return URL.createObjectURL(await (await call(path)).blob());
}

// ------------------------------------------------------------------------------------------------------- router
async function route() {
  clearTimeout(timer);
  const hash = location.hash || "#/jobs";
  const token = hash.match(/^#token=(.+)$/);
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(token[1]));
    history.replaceState(null, "", "#/jobs");
    return route();
  }
  document.getElementById("logout").hidden = !(authRequired && sessionStorage.getItem(TOKEN_KEY));
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", hash.startsWith(`#/${link.dataset.nav}`));
  }
  if (authRequired && !sessionStorage.getItem(TOKEN_KEY)) return showLogin();
  const job = hash.match(/^#\/jobs\/([\w.-]+)/);
  try {
    if (job) await jobPage(job[1]);
    else if (hash.startsWith("#/policies")) await policiesPage();
    else await jobsPage();
  } catch (error) {
    if (error instanceof Unauthorized) {
      sessionStorage.removeItem(TOKEN_KEY);
      return showLogin("That token was not accepted.");
    }
    view.replaceChildren(h("div", { class: "card error" }, String(error.message || error)));
  }
}

function showLogin(message) {
  view.replaceChildren(document.getElementById("login").content.cloneNode(true));
  const error = document.getElementById("login-error");
  if (message) {
    error.textContent = message;
    error.hidden = false;
  }
  document.getElementById("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
    route();
  });
}

// --------------------------------------------------------------------------------------------------------- jobs
function stagePills(detail) {
  return h(
    "div",
    { class: "stages" },
    STAGES.map((stage) => {
      const status = detail?.stages?.[stage] || "";
      const progress = detail?.progress?.[stage];
      const share = status === "running" && progress?.total ? Math.min(1, progress.done / progress.total) : 0;
      return h(
        "div",
        { class: `stage-pill ${status}`, title: `${stage}: ${status || "not started"}` },
        h("div", { class: "fill", style: `width:${(share * 100).toFixed(0)}%` }),
        h("span", {}, stage),
      );
    }),
  );
}

const details = new Map(); // job id -> its last detail (final jobs are never fetched again)

async function jobsPage() {
  const page = await getJSON("/v1/jobs?limit=100");
  await Promise.all(
    page.items
      .filter((job) => !(details.has(job.id) && FINAL.has(details.get(job.id).state)))
      .map(async (job) => details.set(job.id, await getJSON(`/v1/jobs/${job.id}`))),
  );
  const rows = page.items.map((job) => {
    const detail = details.get(job.id);
    const ended = job.finished_at ? new Date(job.finished_at) : new Date();
    const took = job.started_at ? (ended - new Date(job.started_at)) / 1000 : null;
    return h(
      "tr",
      { class: "link", "data-job": job.id, onclick: () => (location.hash = `#/jobs/${job.id}`) },
      h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.name), h("div", { class: "muted mono" }, job.id)),
      h("td", {}, badge(job.state)),
      h("td", {}, stagePills(detail)),
      h("td", {}, when(job.created_at)),
      h("td", {}, duration(took)),
    );
  });
  view.replaceChildren(
    h(
      "section",
      { class: "card" },
      h("div", { class: "head" }, h("h1", {}, "Jobs"), h("span", { class: "muted" }, `${page.total} in all, newest first`)),
      rows.length
        ? h("table", { id: "jobs" }, h("tr", {}, ["job", "state", "stages", "created", "time"].map((t) => h("th", {}, t))), rows)
        : h("p", { class: "muted" }, "No jobs yet: ", h("code", {}, "rmdistill submit spec.yaml"), " or ", h("code", {}, "rmdistill demo"), "."),
    ),
  );
  // The list stays live even when every job shown has ended: a job submitted from the CLI must appear by itself.
  timer = setTimeout(route, page.items.some((job) => !FINAL.has(job.state)) ? POLL_MS : IDLE_POLL_MS);
}

// ---------------------------------------------------------------------------------------------------- job page
function stageTimes(events) {
  const times = {};
  for (const event of events) {
    if (!event.stage) continue;
    const entry = (times[event.stage] ||= {});
    if (event.kind === "stage_started") entry.start = event.ts;
    if (event.kind === "stage_finished") entry.end = event.ts;
    if (event.kind === "stage_skipped") entry.skipped = true;
  }
  return times;
}

function timeline(detail, events) {
  const times = stageTimes(events);
  const starts = Object.values(times).map((t) => t.start).filter(Boolean);
  const t0 = Math.min(...starts);
  const now = Date.now() / 1000;
  const t1 = Math.max(t0 + 1, ...Object.values(times).map((t) => t.end || (t.start ? now : 0)));
  const rows = STAGES.map((stage) => {
    const t = times[stage] || {};
    const status = detail.stages[stage] || (t.skipped ? "skipped" : "");
    const end = t.end || (status === "running" ? now : t.start);
    const bar = t.start
      ? h("div", {
          class: `tl-bar ${status}`,
          style: `left:${(((t.start - t0) / (t1 - t0)) * 100).toFixed(2)}%;width:${(((end - t.start) / (t1 - t0)) * 100).toFixed(2)}%`,
        })
      : null;
    const label = status === "skipped" ? "reused" : t.start ? duration((end || t.start) - t.start) : "—";
    return h("div", { class: "tl-row" }, h("span", {}, stage), h("div", { class: "tl-track" }, bar), h("span", { class: "muted" }, label));
  });
  return h("div", { class: "timeline" }, rows);
}

function chart(title, steps, series, yLabel) {
  const box = h("div", { class: "chart card", "data-chart": title }, h("div", { class: "title" }, title));
  const live = series.filter((s) => s.values.some((v) => v !== null && v !== undefined));
  if (!steps.length || !live.length) {
    box.append(h("div", { class: "empty" }, "no data yet"));
    return box;
  }
  // Three significant digits: uPlot's default rounds a loss that moves by 1e-4 to a column of zeros.
  const tick = (v) => (v == null ? "" : String(Number(v.toPrecision(3))));
  const palette = ["#3b5bdb", "#e8590c", "#2b8a3e", "#ae3ec9", "#0c8599", "#c92a2a", "#5c940d", "#862e9c"];
  const options = {
    width: 560,
    height: 220,
    legend: { live: true },
    scales: { x: { time: false } },
    // Steps are whole numbers: no tick at step 1.25.
    axes: [{ label: "step", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000] }, { label: yLabel || "", size: 60, values: (u, ticks) => ticks.map(tick) }],
    series: [{ label: "step" }, ...live.map((s, i) => ({ label: s.label, stroke: palette[i % palette.length], width: 2, points: { show: steps.length < 40 } }))],
  };
  queueMicrotask(() => {
    options.width = Math.max(320, box.clientWidth - 40);
    const plot = new uPlot(options, [steps, ...live.map((s) => s.values)], box);
    box.dataset.points = String(steps.length * live.length);
    box.dataset.series = String(live.length);
    plot.root.setAttribute("aria-label", title);
  });
  return box;
}

function curves(events) {
  const byStep = new Map();
  for (const event of events) {
    if (event.kind === "metrics" && event.stage === "distill") byStep.set(event.step, event.values);
  }
  const steps = [...byStep.keys()].sort((a, b) => a - b);
  const rows = steps.map((s) => byStep.get(s));
  const column = (key) => rows.map((r) => (typeof r[key] === "number" ? r[key] : null));
  const members = Math.max(0, ...rows.map((r) => (Array.isArray(r.member_losses) ? r.member_losses.length : 0)));
  const perMember = (key) =>
    Array.from({ length: members }, (_, k) => ({ label: `member ${k}`, values: rows.map((r) => (Array.isArray(r[key]) ? r[key][k] : null)) }));
  return h(
    "div",
    { class: "grid2" },
    chart("Loss", steps, [{ label: "loss", values: column("loss") }]),
    chart("Implicit reward margin β·h", steps, [
      { label: "mean β·h", values: column("beta_h_mean") },
      { label: "max β·h", values: column("beta_h_max") },
    ]),
    chart("Log-prob shift, log π − log π_ref", steps, [
      { label: "chosen", values: column("logp_shift_chosen") },
      { label: "rejected", values: column("logp_shift_rejected") },
      { label: "a (unlabelled)", values: column("logp_shift_a") },
      { label: "b (unlabelled)", values: column("logp_shift_b") },
    ], "nats"),
    chart("Per-member loss (e-DPO)", steps, perMember("member_losses")),
    chart("Member chosen by the pessimistic min (count)", steps, perMember("member_argmin_counts")),
    chart("Forward KL(π_ref‖π)", steps, [{ label: "forward KL", values: column("forward_kl") }], "nats"),
  );
}

function ensembleCard(manifest) {
  if (!manifest) return h("p", { class: "muted" }, "No reward models for this job (a labelled loss, or reused ones).");
  const meter = (value) => h("div", { class: "meter" }, h("div", { style: `width:${(value * 100).toFixed(0)}%` }));
  return h(
    "div",
    {},
    h(
      "div",
      { class: "kpis" },
      kpi(fmt(manifest.ensemble_mean_accuracy), "ensemble-mean accuracy (held out)"),
      kpi(fmt(manifest.mean_member_accuracy), "mean member accuracy"),
      kpi(fmt(manifest.margin_std), "disagreement: std of member margins"),
      kpi(String(manifest.test_pairs), "held-out pairs"),
    ),
    h(
      "table",
      { id: "members" },
      h("tr", {}, ["member", "backbone", "accuracy", "", "validation acc.", "loss", "epochs"].map((t) => h("th", {}, t))),
      manifest.members.map((m) =>
        h("tr", {}, h("td", {}, m.member), h("td", { class: "mono" }, m.backbone), h("td", {}, fmt(m.accuracy)), h("td", {}, meter(m.accuracy)),
          h("td", {}, fmt(m.validation_accuracy)), h("td", {}, fmt(m.loss, 4)), h("td", {}, `${m.epochs_run} (best ${m.best_epoch})`)),
      ),
    ),
  );
}

const kpi = (value, label) => h("div", { class: "kpi" }, h("div", { class: "v" }, value), h("div", { class: "l" }, label));

function evaluationCard(report, plots) {
  if (!report) return h("p", { class: "muted" }, "No evaluation yet.");
  const win = report.win_rate;
  const lengths = report.lengths || {};
  return h(
    "div",
    {},
    h(
      "div",
      { class: "kpis", id: "evaluation" },
      kpi(win ? `${(win.rate * 100).toFixed(1)}%` : "—", win ? `win rate vs π_ref, 95% CI [${fmt(win.lo)}, ${fmt(win.hi)}] (${report.oracle})` : "no oracle"),
      kpi(`${fmt(report.kl?.estimate)} ± ${fmt(report.kl?.stderr)}`, "KL(π‖π_ref), nats"),
      kpi(`${fmt(lengths.policy?.mean_tokens, 1)} / ${fmt(lengths.reference?.mean_tokens, 1)}`, "mean tokens, policy / π_ref"),
      kpi(fmt(report.chosen_logratio), "log π − log π_ref on chosen"),
    ),
    plots.length ? h("div", { class: "plots", id: "plots" }, plots) : null,
    (report.examples || []).length
      ? h(
          "table",
          { class: "examples" },
          h("tr", {}, ["prompt", "policy", "π_ref"].map((t) => h("th", {}, t))),
          report.examples.map((e) => h("tr", {}, h("td", {}, e.prompt), h("td", {}, e.policy), h("td", {}, e.reference))),
        )
      : null,
  );
}

function eventLine(event) {
  const time = event.ts ? new Date(event.ts * 1000).toLocaleTimeString() : "--:--:--";
  let detail = event.message || "";
  if (event.kind === "metrics") {
    detail = `step ${event.step}: ` + Object.entries(event.values || {}).filter(([, v]) => typeof v === "number").map(([k, v]) => `${k}=${fmt(v, 4)}`).join(", ");
  } else if (event.kind === "progress") detail = `${event.done}/${event.total}`;
  else if (event.kind === "stage_finished" && typeof event.seconds === "number") detail = `done in ${duration(event.seconds)}`;
  else if (event.kind === "job_finished") detail = event.status;
  return h("div", { class: event.kind }, `${time}  ${(event.stage || "").padEnd(9)} ${event.kind.padEnd(15)} ${detail}`);
}

async function downloadArtifact(jobId, artifact) {
  const url = await blobURL(artifact.url);
  const link = h("a", { href: url, download: `${jobId}-${artifact.path.replaceAll("/", "-")}` });
  document.body.append(link);
  link.click();
  link.remove();
}

function artifactTable(jobId, artifacts) {
  const size = (a) => (a.bytes === null ? "built when downloaded" : a.bytes < 1 << 20 ? `${(a.bytes / 1024).toFixed(1)} KiB` : `${(a.bytes / (1 << 20)).toFixed(1)} MiB`);
  const label = { policy: "the policy (a Hugging Face folder)", archive: "the stage folder", report: "evaluation report", plot: "plot", pairs: "scored pairs" };
  return h(
    "table",
    { class: "artifacts" },
    artifacts.map((a) =>
      h("tr", {}, h("td", { class: "mono" }, h("a", { href: "#", onclick: (e) => { e.preventDefault(); downloadArtifact(jobId, a); } }, a.path)),
        h("td", {}, label[a.kind] || a.kind), h("td", { class: "muted" }, size(a))),
    ),
  );
}

async function jobPage(id) {
  const detail = await getJSON(`/v1/jobs/${id}`);
  const { events } = await getJSON(`/v1/jobs/${id}/events?limit=10000`);
  const artifacts = (await getJSON(`/v1/jobs/${id}/artifacts`)).items;
  const has = (path) => artifacts.some((a) => a.path === path);
  const manifest = has("ensemble/manifest.json") ? await getJSON(`/v1/jobs/${id}/artifacts/ensemble/manifest.json`) : null;
  const report = has("evaluate/report.json") ? (await getJSON(`/v1/jobs/${id}/results`)).evaluate : null;
  const plots = await Promise.all(
    artifacts.filter((a) => a.kind === "plot").map(async (a) =>
      h("figure", {}, h("img", { src: await blobURL(a.url), alt: a.path }), h("figcaption", {}, a.path)),
    ),
  );
  const started = detail.started_at ? new Date(detail.started_at) : null;
  const ended = detail.finished_at ? new Date(detail.finished_at) : new Date();
  view.replaceChildren(
    h(
      "section",
      { class: "card" },
      h("div", { class: "head" }, h("h1", {}, detail.name), badge(detail.state), h("span", { class: "mono muted" }, detail.id)),
      h(
        "div",
        { class: "facts" },
        h("span", {}, "created ", h("b", {}, when(detail.created_at))),
        h("span", {}, "ran for ", h("b", {}, started ? duration((ended - started) / 1000) : "—")),
        h("span", {}, "reference ", h("b", { class: "mono" }, detail.spec.reference)),
        h("span", {}, "loss ", h("b", {}, detail.spec.distill?.loss), ` (β ${detail.spec.distill?.beta})`),
        detail.policy_id ? h("a", { href: `#/policies?policy=${detail.policy_id}` }, "open its policy in the playground →") : null,
      ),
      detail.error ? h("p", { class: "error" }, detail.error) : null,
    ),
    h("section", { class: "card" }, h("h2", {}, "Stages"), timeline(detail, events)),
    h("h2", {}, "Training curves"),
    curves(events),
    h("section", { class: "card" }, h("h2", {}, "Reward-model ensemble"), ensembleCard(manifest)),
    h("section", { class: "card" }, h("h2", {}, "Evaluation"), evaluationCard(report, plots)),
    h("section", { class: "card" }, h("h2", {}, `Event log (${events.length})`), h("div", { class: "log", id: "events" }, events.slice(-300).map(eventLine))),
    h(
      "section",
      { class: "card" },
      h("h2", {}, "Artifacts"),
      artifactTable(id, artifacts.filter((a) => a.kind !== "file")),
      h("details", {}, h("summary", { class: "muted" }, `every file (${artifacts.filter((a) => a.kind === "file").length} more)`),
        artifactTable(id, artifacts.filter((a) => a.kind === "file"))),
    ),
  );
  const log = document.getElementById("events");
  log.scrollTop = log.scrollHeight;
  if (!FINAL.has(detail.state)) timer = setTimeout(route, POLL_MS);
}

// ------------------------------------------------------------------------------------------ policies, playground
async function policiesPage() {
  const { items } = await getJSON("/v1/policies");
  const trained = items.filter((p) => !p.id.startsWith("ref-"));
  const wanted = new URLSearchParams(location.hash.split("?")[1] || "").get("policy");
  const select = h("select", { id: "policy" }, trained.map((p) => h("option", { value: p.id, selected: p.id === wanted }, p.id)));
  const prompt = h("textarea", { id: "prompt" }, "In one sentence, review a small seaside café.");
  const maxTokens = h("input", { id: "max-tokens", type: "number", value: "64", min: "1", max: "1024" });
  const temperature = h("input", { id: "temperature", type: "number", value: "0.7", min: "0", max: "2", step: "0.1" });
  const panes = { policy: answerPane("policy", "answer-policy"), reference: answerPane("π_ref", "answer-reference") };
  const run = h("button", { id: "run", onclick: () => playground(select.value, prompt.value, +maxTokens.value, +temperature.value, panes, run) }, "Ask both");
  view.replaceChildren(
    h(
      "section",
      { class: "card" },
      h("h1", {}, "Policies"),
      h(
        "table",
        { id: "policies" },
        h("tr", {}, ["policy", "job", "reference", "loss", "win rate", "created"].map((t) => h("th", {}, t))),
        trained.map((p) => {
          const win = p.summary?.eval?.win_rate;
          return h("tr", {}, h("td", { class: "mono" }, p.id), h("td", {}, p.job_id ? h("a", { href: `#/jobs/${p.job_id}` }, p.job_id) : "—"),
            h("td", { class: "mono" }, p.base_model || "—"), h("td", {}, p.loss || "—"), h("td", {}, win ? `${(win.rate * 100).toFixed(1)}%` : "—"),
            h("td", {}, when(p.created_at)));
        }),
      ),
    ),
    h(
      "section",
      { class: "card playground" },
      h("h1", {}, "Playground"),
      h("p", { class: "muted" }, "One prompt to the policy and to the reference model it started from (π_ref), streamed side by side."),
      trained.length
        ? [
            h("div", { class: "controls" }, h("label", {}, "policy", select), h("label", {}, "max tokens", maxTokens), h("label", {}, "temperature", temperature), run),
            prompt,
            h("div", { class: "answers" }, panes.policy.box, panes.reference.box),
          ]
        : h("p", { class: "muted" }, "No policy yet: a job registers one when it succeeds."),
    ),
  );
}

function answerPane(title, id) {
  const text = h("div", { class: "text" });
  const box = h("div", { class: "answer", id }, h("h3", {}, title), text);
  return { box, text, title: box.querySelector("h3") };
}

async function playground(policyId, prompt, maxTokens, temperature, panes, button) {
  button.disabled = true;
  try {
    const reference = await (await call(`/v1/policies/${policyId}/reference`, { method: "POST" })).json();
    panes.policy.title.textContent = `policy ${policyId}`;
    panes.reference.title.textContent = `π_ref ${reference.base_model}`;
    await Promise.all([
      stream(policyId, prompt, maxTokens, temperature, panes.policy),
      stream(reference.id, prompt, maxTokens, temperature, panes.reference),
    ]);
  } catch (error) {
    panes.policy.text.textContent = `error: ${error.message}`;
  } finally {
    button.disabled = false;
  }
}

// One chat completion streamed through the OpenAI-compatible endpoint, its deltas appended as they arrive.
async function stream(model, prompt, maxTokens, temperature, pane) {
  pane.text.textContent = "";
  pane.box.classList.add("streaming");
  pane.box.dataset.chunks = "0";
  try {
    const response = await call("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages: [{ role: "user", content: prompt }], max_tokens: maxTokens, temperature, stream: true }),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices?.[0]?.delta?.content;
          if (delta) {
            pane.text.textContent += delta;
            pane.box.dataset.chunks = String(+pane.box.dataset.chunks + 1);
          }
        }
      }
    }
  } finally {
    pane.box.classList.remove("streaming");
    pane.box.dataset.done = "true";
  }
}

// ------------------------------------------------------------------------------------------------------- start
document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  route();
});
window.addEventListener("hashchange", route);
fetch("/healthz")
  .then((r) => r.json())
  .then((health) => (authRequired = health.auth))
  .catch(() => {})
  .finally(route);
