// The per-sample view: request a loss report, draw its histogram (uPlot bars), brush a loss
// range to count the samples in it, then fork a specialist on them or export them.

import { countInRange, histogram } from "./series.js";

const $ = (id) => document.getElementById(id);
const BINS = 40;

function numberOrNull(id) {
  const raw = $(id).value.trim();
  if (raw === "") return null;
  const v = Number(raw);
  return Number.isFinite(v) ? v : NaN;
}

export class Samples {
  constructor(store, run) {
    this.store = store;
    this.run = run;
    this.report = null; // {losses, indices, owner, split, step}
    this.hist = null;
    this.u = null;
    this.range = null; // [lo, hi]
    this.runsVersion = -1;
    $("report-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.requestReport();
    });
    for (const id of ["sel-min", "sel-max"]) $(id).addEventListener("change", () => this.rangeFromInputs());
    $("fork-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.fork();
    });
    $("export-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.exportSubset();
    });
    window.addEventListener("resize", () => {
      if (this.u) this.u.setSize({ width: this.width(), height: 200 });
    });
  }

  width() {
    return Math.max(240, $("histogram").clientWidth || 400);
  }

  refresh() {
    const session = this.store.viewSession;
    const select = $("report-run");
    const ids = session ? Array.from(session.runs.keys()) : [];
    const key = ids.join(",") + "|" + (session ? session.currentRun : "");
    if (key !== this.runsVersion) {
      this.runsVersion = key;
      const keep = select.value;
      select.replaceChildren(...ids.map((id) => new Option(id, id)));
      select.value = ids.includes(keep) && keep ? keep : (session && session.currentRun) || ids[0] || "";
    }
    if (this.pending && this.store.scanProgress) {
      const p = this.store.scanProgress;
      $("report-state").textContent = `scanning… ${p.done}/${p.total}`;
    }
  }

  async requestReport() {
    const owner = $("report-run").value || undefined;
    const split = $("report-split").value;
    const button = $("btn-report");
    button.disabled = true;
    this.pending = true;
    this.store.scanProgress = null;
    $("report-state").textContent = "scanning…";
    try {
      const data = await this.run("generate_report", { owner_run_id: owner, subset_on: split, reqId: Date.now() });
      if (!data) {
        $("report-state").textContent = "report failed (see errors)";
        return;
      }
      const meta = data.meta || {};
      this.report = {
        losses: data.losses,
        indices: data.sample_indices,
        owner: data.owner_run_id,
        split: meta.subset_on || split,
        step: meta.at_step,
      };
      $("report-state").textContent = `${data.losses.length} samples of ${this.report.owner} (${this.report.split}) at step ${meta.at_step}`;
      this.store.lastReport = this.report;
      this.drawHistogram();
    } finally {
      this.pending = false;
      button.disabled = false;
    }
  }

  drawHistogram() {
    const hist = histogram(this.report.losses, BINS);
    this.hist = hist;
    const box = $("histogram");
    box.dataset.bins = String(hist.counts.length);
    box.dataset.samples = String(hist.n);
    if (this.u) {
      this.u.destroy();
      this.u = null;
    }
    this.range = null;
    $("selection").hidden = true;
    if (!hist.n) {
      box.textContent = "the report holds no finite losses";
      return;
    }
    box.textContent = "";
    const centers = hist.counts.map((_, i) => (hist.edges[i] + hist.edges[i + 1]) / 2);
    const lo = hist.edges[0];
    const hi = hist.edges[hist.edges.length - 1];
    const opts = {
      width: this.width(),
      height: 200,
      scales: { x: { time: false, range: () => [lo, hi] }, y: { range: (u, mn, mx) => [0, Math.max(1, mx) * 1.05] } },
      series: [
        { label: "loss", value: (u, v) => (v === null || v === undefined ? "-" : v.toPrecision(4)) },
        { label: "samples", fill: "#93c5fd", stroke: "#2563eb", paths: uPlot.paths.bars({ size: [0.92, Infinity] }), points: { show: false } },
      ],
      axes: [{ stroke: "#475569", grid: { show: false } }, { stroke: "#475569", grid: { stroke: "#e2e8f0" }, size: 50 }],
      cursor: { drag: { x: true, y: false, setScale: false }, points: { show: false } },
      legend: { live: true },
      hooks: { setSelect: [(u) => this.rangeFromSelect(u)] },
    };
    this.u = new uPlot(opts, [centers, hist.counts], box);
  }

  rangeFromSelect(u) {
    if (!u.select || u.select.width < 2) return;
    const right = u.select.left + u.select.width;
    const plotWidth = u.over.clientWidth;
    // A brush that reaches an edge (within 3 px) means "from the lowest" / "up to the highest".
    const lo = u.select.left <= 3 ? this.hist.min : Math.max(this.hist.min, u.posToVal(u.select.left, "x"));
    const hi = right >= plotWidth - 3 ? this.hist.max : Math.min(this.hist.max, u.posToVal(right, "x"));
    this.setRange(lo, hi, false);
  }

  rangeFromInputs() {
    const lo = numberOrNull("sel-min");
    const hi = numberOrNull("sel-max");
    if (lo === null || hi === null) return; // still typing: nothing to count yet
    if (Number.isNaN(lo) || Number.isNaN(hi) || lo > hi) {
      $("samples-result").textContent = "min loss and max loss must be numbers with min <= max";
      return;
    }
    this.setRange(lo, hi, true);
  }

  setRange(lo, hi, moveBrush) {
    this.range = [lo, hi];
    const count = countInRange(this.report.losses, lo, hi);
    $("sel-min").value = String(lo);
    $("sel-max").value = String(hi);
    $("sel-count").textContent = String(count);
    $("selection").hidden = false;
    $("selection").dataset.count = String(count);
    $("btn-fork").textContent = `Fork on ${count} samples`;
    $("btn-export").textContent = `Export ${count} samples`;
    const note = this.report.split !== "train" ? " Note: fork selects from the training set; this report is on " + this.report.split + "." : "";
    $("samples-result").textContent = note.trim();
    if (moveBrush && this.u) {
      const left = this.u.valToPos(lo, "x");
      const right = this.u.valToPos(hi, "x");
      this.u.setSelect({ left, width: Math.max(1, right - left), top: 0, height: this.u.over.clientHeight }, false);
    }
  }

  region() {
    return { minLoss: this.range[0], maxLoss: this.range[1] };
  }

  async fork() {
    if (!this.range) return;
    const hparams = {};
    const fields = [
      ["fork-lr", "lr"],
      ["fork-lr-mul", "lr_mul"],
      ["fork-wd-mul", "wd_mul"],
      ["fork-batch", "batch_size"],
      ["fork-steps", "max_steps"],
      ["fork-epochs", "epochs"],
      ["fork-patience", "patience"],
    ];
    for (const [id, key] of fields) {
      const v = numberOrNull(id);
      if (v === null) continue;
      if (Number.isNaN(v)) {
        this.store.addError("bad_input", `${key} must be a number`, "page");
        return;
      }
      hparams[key] = ["batch_size", "max_steps", "epochs", "patience"].includes(key) ? Math.round(v) : v;
    }
    const payload = { parent_run_id: this.report.owner, region: this.region() };
    if (Object.keys(hparams).length) payload.hparams = hparams;
    const name = $("fork-name").value.trim();
    if (name) payload.run_name = name;
    $("btn-fork").disabled = true;
    try {
      const data = await this.run("fork", payload);
      if (data) {
        $("samples-result").textContent = `forked ${data.new_run} from ${data.parent} on ${data.subset_count} samples`;
        this.store.addLog(`forked ${data.new_run} on ${data.subset_count} samples`, "info");
        $("fork-name").value = "";
      }
    } finally {
      $("btn-fork").disabled = false;
    }
  }

  async exportSubset() {
    if (!this.range) return;
    const payload = { run_id: this.report.owner, region: this.region(), format: $("export-format").value, subset_on: this.report.split };
    const path = $("export-path").value.trim();
    if (path) payload.out_path = path;
    $("btn-export").disabled = true;
    try {
      const data = await this.run("export_subset", payload);
      if (data) $("samples-result").textContent = `exported ${data.rows} rows (${data.format}) to ${data.out_path}`;
    } finally {
      $("btn-export").disabled = false;
    }
  }
}
