// The live charts (uPlot): loss (raw, smoothed, val), learning rate, grad norm, throughput.
// Every point stays in the store; each redraw thins what is visible to about one point pair
// per pixel column. Children start at their branch point; markers show pause/edit/test/fork/merge.

import { emaInto, latestPerX, thinIndices } from "./series.js";
import { MARKER_KINDS } from "./store.js";

export const PALETTE = ["#2563eb", "#ea580c", "#16a34a", "#dc2626", "#9333ea", "#0891b2", "#ca8a04", "#db2777", "#4b5563", "#65a30d"];
export const MARKER_STYLE = {
  pause: { color: "#d97706", letter: "P", title: "pause" },
  edit: { color: "#7c3aed", letter: "E", title: "hyperparameter edit" },
  test: { color: "#0d9488", letter: "T", title: "test" },
  fork: { color: "#16a34a", letter: "F", title: "fork" },
  merge: { color: "#dc2626", letter: "M", title: "merge" },
};
// Redraw at most this often; while events stream in fast (a run logging every step), once a
// second: a redraw costs the same however many points arrived, and the browser's CPU is the run's.
const MIN_REDRAW_MS = 250;
const BUSY_REDRAW_MS = 1000;
const BUSY_ITEMS_PER_DRAW = 500;

const SPECS = [
  {
    key: "loss",
    title: "Loss",
    height: 280,
    groups: [
      { metric: "loss", lines: [{ kind: "raw", label: "loss" }, { kind: "smooth", label: "loss (smoothed)" }] },
      { metric: "val_loss", lines: [{ kind: "val", label: "val loss" }] },
    ],
  },
  { key: "lr", title: "Learning rate", height: 180, groups: [{ metric: "lr", lines: [{ kind: "plain", label: "lr" }] }] },
  { key: "grad_norm", title: "Grad norm", height: 180, groups: [{ metric: "grad_norm", lines: [{ kind: "plain", label: "grad norm" }] }] },
  { key: "throughput", title: "Throughput (samples/s)", height: 180, groups: [{ metric: "throughput", lines: [{ kind: "plain", label: "samples/s" }] }] },
];

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function fmtValue(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "-";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(3);
  return v.toPrecision(5);
}

function fmtTick(v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(1);
  return String(Number(v.toPrecision(4)));
}

function withAlpha(hex, alpha) {
  const a = Math.round(alpha * 255).toString(16).padStart(2, "0");
  return hex + a;
}

export class Charts {
  constructor(root, store) {
    this.root = root;
    this.store = store;
    this.xKey = "step"; // "step" or "ts" (wall time)
    this.alpha = 0.6; // EMA smoothing of the train loss
    this.showRaw = true;
    this.view = null; // [min, max] of the shared zoom window; null: everything
    this.markerKinds = Object.fromEntries(MARKER_KINDS.map((k) => [k, true]));
    this.panels = SPECS.map((spec) => this.makePanel(spec));
    this.scheduled = false;
    this.lastDraw = 0;
    this.itemsSinceDraw = 0;
    this.busy = false;
    this.draws = 0;
    window.addEventListener("resize", () => this.resize());
  }

  makePanel(spec) {
    const points = h("span", { class: "points" }, "no data yet");
    const log = h("input", { type: "checkbox", class: "log-toggle" });
    const plot = h("div", { class: "plot" });
    const node = h(
      "div",
      { class: `chart chart-${spec.key}`, "data-chart": spec.key, "data-points": "0", "data-shown": "0", "data-runs": "" },
      h("div", { class: "chart-head" }, h("h3", {}, spec.title), points, h("label", { class: "log-label" }, log, " log scale")),
      plot,
    );
    this.root.append(node);
    const panel = { spec, node, plot, points, log, u: null, signature: null };
    log.addEventListener("change", () => {
      panel.signature = null;
      this.schedule();
    });
    return panel;
  }

  setXKey(key) {
    this.xKey = key;
    this.view = null;
    for (const p of this.panels) p.signature = null;
    this.schedule();
  }

  setAlpha(alpha) {
    this.alpha = alpha;
    this.schedule();
  }

  setShowRaw(show) {
    this.showRaw = show;
    for (const p of this.panels) p.signature = null;
    this.schedule();
  }

  setMarkerKind(kind, on) {
    this.markerKinds[kind] = on;
    for (const p of this.panels) if (p.u) p.u.redraw(false, false);
  }

  resetZoom() {
    this.view = null;
    this.draw();
  }

  resize() {
    for (const p of this.panels) if (p.u) p.u.setSize({ width: this.widthOf(p), height: p.spec.height });
  }

  widthOf(panel) {
    return Math.max(240, Math.floor(panel.plot.clientWidth || panel.node.clientWidth || 600));
  }

  /** Redraw soon (`items`: how many history items just arrived), throttled as described above. */
  schedule(items = 0) {
    this.itemsSinceDraw += items;
    if (this.scheduled) return;
    this.scheduled = true;
    const interval = this.busy ? BUSY_REDRAW_MS : MIN_REDRAW_MS;
    const wait = Math.max(0, interval - (performance.now() - this.lastDraw));
    setTimeout(() => {
      requestAnimationFrame(() => {
        this.scheduled = false;
        this.lastDraw = performance.now();
        this.busy = this.itemsSinceDraw > BUSY_ITEMS_PER_DRAW;
        this.itemsSinceDraw = 0;
        this.draw();
      });
    }, wait);
  }

  draw() {
    this.draws++;
    for (const panel of this.panels) this.drawPanel(panel);
  }

  /** Aligned uPlot data and series options for one panel, from the store. */
  build(panel) {
    const session = this.store.viewSession;
    const tables = [];
    const series = [];
    const runsDrawn = [];
    let points = 0;
    let shown = 0;
    const log = panel.log.checked;
    const buckets = Math.max(100, this.widthOf(panel));
    const [vmin, vmax] = this.view || [null, null];
    const runs = session ? Array.from(session.runs.values()).filter((r) => r.visible) : [];
    for (const run of runs) {
      const color = PALETTE[run.colorIndex % PALETTE.length];
      let drew = false;
      for (const group of panel.spec.groups) {
        const s = run.metrics[group.metric];
        if (!s.length) continue;
        const lines = group.lines.filter((l) => l.kind !== "raw" || this.showRaw);
        if (!lines.length) continue;
        const main = group === panel.spec.groups[0]; // the header counts the chart's main metric
        if (main) points += s.length;
        const table = this.linesFor(session, run, group.metric, lines, vmin, vmax, buckets, log);
        if (!table[0].length) continue;
        if (main) shown += table[0].length;
        tables.push(table);
        drew = true;
        for (const line of lines) {
          series.push({
            label: `${run.id} ${line.label}`,
            stroke: line.kind === "raw" ? withAlpha(color, 0.35) : color,
            width: line.kind === "raw" ? 1 : line.kind === "val" ? 1.5 : 2,
            dash: line.kind === "val" ? [6, 4] : undefined,
            // val points: uPlot's default shows the dots only where they are far enough apart.
            points: line.kind === "val" ? { size: 5, fill: color } : { show: false },
            spanGaps: true,
            value: (u, v) => fmtValue(v),
          });
        }
      }
      if (drew) runsDrawn.push(run.id);
    }
    let data;
    if (!tables.length) data = [[]];
    else if (tables.length === 1) data = tables[0];
    else data = uPlot.join(tables);
    const signature = JSON.stringify([this.xKey, log, this.showRaw, series.map((s) => s.label)]);
    return { data, series, signature, points, shown, runsDrawn };
  }

  /** [xs, ys per line] for one metric of one run, thinned to the window, from its branch point. */
  linesFor(session, run, metric, lines, vmin, vmax, buckets, log) {
    const s = run.metrics[metric];
    const key = this.xKey;
    let xs = s[key];
    const columns = lines.map((l) => (l.kind === "smooth" ? emaInto(run.ema, s.val, this.alpha) : s.val));
    let start = null;
    if (run.branch && run.parents.length && run.branch.step !== null && run.branch.step !== undefined) {
      const parent = session.runs.get(run.parents[0]);
      const ps = parent ? parent.metrics[metric] : null;
      const bx = key === "step" ? run.branch.step : run.branch.ts;
      const p = ps ? ps.pointAtOrBefore(key, bx) : null;
      if (p) {
        const smooth = lines.some((l) => l.kind === "smooth") ? emaInto(parent.ema, ps.val, this.alpha) : null;
        start = { x: p[key], ys: lines.map((l) => (l.kind === "smooth" ? smooth[p.index] : p.val)) };
      }
    }
    let out = [];
    if (key === "step" && s.rewound) {
      const merged = columns.map((ys) => latestPerX(s.step, ys));
      xs = merged[0][0];
      out = [xs, ...merged.map((m) => m[1])];
    } else {
      out = [xs, ...columns];
    }
    // Thin by the first column's shape; the other columns are taken at the same points.
    const idx = thinIndices(out[0], out[1], buckets, vmin, vmax);
    let result = out.map((col) => idx.map((i) => col[i]));
    if (start && (!result[0].length || result[0][0] > start.x)) {
      result = [[start.x, ...result[0]], ...result.slice(1).map((ys, i) => [start.ys[i], ...ys])];
    }
    if (log) result = [result[0], ...result.slice(1).map((ys) => ys.map((v) => (v !== null && v > 0 ? v : null)))];
    return result;
  }

  drawPanel(panel) {
    const built = this.build(panel);
    panel.node.dataset.points = String(built.points);
    panel.node.dataset.shown = String(built.shown);
    panel.node.dataset.runs = built.runsDrawn.join(",");
    panel.points.textContent = built.points
      ? `${built.points.toLocaleString()} points, ${built.shown.toLocaleString()} drawn`
      : "no data yet";
    if (!built.series.length) {
      if (panel.u) {
        panel.u.destroy();
        panel.u = null;
      }
      panel.signature = null;
      return;
    }
    if (panel.u && panel.signature === built.signature) {
      if (this.view) {
        panel.u.setData(built.data, false);
        panel.u.setScale("x", { min: this.view[0], max: this.view[1] });
      } else {
        panel.u.setData(built.data);
      }
      return;
    }
    if (panel.u) panel.u.destroy();
    panel.u = new uPlot(this.options(panel, built), built.data, panel.plot);
    panel.u.over.addEventListener("dblclick", () => this.resetZoom());
    panel.signature = built.signature;
    if (this.view) panel.u.setScale("x", { min: this.view[0], max: this.view[1] });
  }

  options(panel, built) {
    const time = this.xKey === "ts";
    const log = panel.log.checked;
    return {
      width: this.widthOf(panel),
      height: panel.spec.height,
      scales: { x: { time }, y: log ? { distr: 3, log: 10 } : { auto: true } },
      series: [{ label: time ? "time" : "step", value: (u, v) => (v === null || v === undefined ? "-" : time ? new Date(v * 1000).toLocaleTimeString() : String(v)) }, ...built.series],
      axes: [{ stroke: "#475569", grid: { stroke: "#e2e8f0" } }, { stroke: "#475569", grid: { stroke: "#e2e8f0" }, size: 64, values: (u, vals) => vals.map(fmtTick) }],
      // A drag selects an x range; we apply it to every chart ourselves (setScale: false), so
      // that each one re-thins its data for the window instead of stretching the overview.
      cursor: { sync: { key: "onthefly-x" }, drag: { x: true, y: false, setScale: false } },
      legend: { live: true },
      hooks: {
        setSelect: [(u) => this.onSelect(u)],
        draw: [(u) => this.drawMarkers(u)],
      },
    };
  }

  onSelect(u) {
    if (!u.select || u.select.width < 3) return;
    const min = u.posToVal(u.select.left, "x");
    const max = u.posToVal(u.select.left + u.select.width, "x");
    u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
    this.zoomTo(min, max);
  }

  /** Show only x in [min, max] on every chart (redrawn now: the user is waiting). */
  zoomTo(min, max) {
    if (!(max > min)) return;
    this.view = [min, max];
    this.draw();
  }

  drawMarkers(u) {
    const session = this.store.viewSession;
    if (!session || !session.markers.length) return;
    const ctx = u.ctx;
    const { left, top, width, height } = u.bbox;
    const ratio = window.devicePixelRatio || 1;
    ctx.save();
    ctx.lineWidth = ratio;
    ctx.font = `bold ${10 * ratio}px sans-serif`;
    for (const m of session.markers) {
      if (!this.markerKinds[m.kind]) continue;
      const x = this.xKey === "step" ? m.step : m.ts;
      if (x === null || x === undefined) continue;
      const px = u.valToPos(x, "x", true);
      if (!(px >= left && px <= left + width)) continue;
      const style = MARKER_STYLE[m.kind];
      ctx.strokeStyle = style.color;
      ctx.fillStyle = style.color;
      ctx.setLineDash([4 * ratio, 3 * ratio]);
      ctx.beginPath();
      ctx.moveTo(px, top);
      ctx.lineTo(px, top + height);
      ctx.stroke();
      // One row per kind, so a pause and a fork at the same step stay readable.
      ctx.fillText(style.letter, px + 2 * ratio, top + (10 + 11 * MARKER_KINDS.indexOf(m.kind)) * ratio);
    }
    ctx.restore();
  }
}
