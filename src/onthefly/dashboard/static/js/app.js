// Bootstraps the page: one store fed by the WebSocket, charts and panels that read it, and the
// `run(cmd, payload)` helper every button uses (a failure is shown with its code and message).

import { Charts, MARKER_STYLE } from "./charts.js";
import { Connection } from "./connection.js";
import { Panels } from "./panels.js";
import { Samples } from "./samples.js";
import { MARKER_KINDS, Store } from "./store.js";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 200;
const RUNS_REFRESH_MS = 300;

const token = new URLSearchParams(location.search).get("token") || "";
const store = new Store();
const charts = new Charts($("charts"), store);
let hello = null;

async function run(cmd, payload = {}, opts = {}) {
  try {
    const data = await conn.command(cmd, payload);
    return data === null || data === undefined ? {} : data;
  } catch (err) {
    const code = err.code || "error";
    const message = `${cmd}: ${err.detail || err.message}`;
    if (opts.quiet) store.addLog(`[${code}] ${message}`, "warn");
    else store.addError(code, message, "command");
    scheduleRefresh();
    return null;
  }
}

const panels = new Panels(store, charts, run);
const samples = new Samples(store, run);

let refreshTimer = null;
function scheduleRefresh() {
  if (refreshTimer !== null) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    panels.refresh();
    samples.refresh();
    renderFooter();
  }, REFRESH_MS);
}

let runsTimer = null;
function scheduleRunsRefresh() {
  if (runsTimer !== null) return;
  runsTimer = setTimeout(() => {
    runsTimer = null;
    if (store.trainerConnected) panels.requestRuns();
  }, RUNS_REFRESH_MS);
}

function renderFooter() {
  const parts = [];
  if (hello) {
    parts.push(`onthefly ${hello.version}`);
    if (hello.mode === "process") parts.push(`script: ${(hello.argv || []).join(" ")}`);
    else if (hello.trainer) parts.push(`trainers connect to ${hello.trainer}`);
  }
  parts.push(`${store.trainerEvents.toLocaleString()} events`);
  $("footer").textContent = parts.join(" · ");
}

function onItems(items) {
  for (const item of items) {
    store.apply(item);
    const t = item.type;
    if (t === "newRun" || t === "trainingFinished" || t === "finalizeRun" || (t === "dashboard.connection" && item.connected)) {
      scheduleRunsRefresh();
    }
  }
  charts.schedule(items.length);
  scheduleRefresh();
}

const conn = new Connection(token, {
  onHello(msg) {
    hello = msg;
    scheduleRefresh();
  },
  onReset() {
    store.reset();
    for (const p of charts.panels) p.signature = null;
    panels.treeVersion = -1;
    panels.errorsShown = -1;
    charts.schedule();
    scheduleRefresh();
  },
  onItems,
  onState(state) {
    const badge = $("page-link");
    badge.dataset.state = state;
    badge.textContent = state === "live" ? "page: live" : `page: ${state}`;
  },
  onProtocolError(text) {
    store.addError("page_protocol", text, "page");
    scheduleRefresh();
  },
});

// The chart toolbar.
$("x-axis").addEventListener("change", (ev) => charts.setXKey(ev.target.value));
$("ema").addEventListener("input", (ev) => {
  const alpha = Number(ev.target.value);
  $("ema-value").textContent = alpha.toFixed(2);
  charts.setAlpha(alpha);
});
$("show-raw").addEventListener("change", (ev) => charts.setShowRaw(ev.target.checked));
$("btn-reset-zoom").addEventListener("click", () => charts.resetZoom());
for (const kind of MARKER_KINDS) {
  const style = MARKER_STYLE[kind];
  const box = Object.assign(document.createElement("input"), { type: "checkbox", checked: true });
  box.addEventListener("change", () => charts.setMarkerKind(kind, box.checked));
  const label = document.createElement("label");
  label.className = "marker-toggle";
  label.title = `show ${style.title} markers`;
  const letter = Object.assign(document.createElement("span"), { className: "marker-letter", textContent: style.letter });
  letter.style.color = style.color;
  label.append(box, letter, ` ${kind}`);
  $("markers-legend").append(label);
}

window.onthefly = { store, charts, panels, samples, conn };
if (!token) store.addError("no_token", "open the URL printed by `onthefly dashboard`: it carries the access token", "page");
conn.connect();
scheduleRefresh();
