// The page's model of the training: sessions, runs (lineage, metric series), markers, status,
// log and errors, built from the ordered history items the server streams. No DOM here.

import { Series } from "./series.js";

export const METRICS = ["loss", "val_loss", "lr", "grad_norm", "throughput"];
export const MARKER_KINDS = ["pause", "edit", "test", "fork", "merge"];
const LOG_KEEP = 400;
const ERRORS_KEEP = 100;

function finite(v) {
  return typeof v === "number" && Number.isFinite(v);
}

function fmtNum(v) {
  if (!finite(v)) return String(v);
  if (v === 0 || (Math.abs(v) >= 1e-3 && Math.abs(v) < 1e5)) return v.toFixed(4);
  return v.toExponential(3);
}

/** One readable line for an event (null: not worth a line), like the terminal dashboard's. */
export function describeEvent(e) {
  const at = e.step !== undefined && e.step !== null ? ` at step ${e.step}` : "";
  switch (e.type) {
    case "trainStep":
    case "testStep":
    case "scan_progress":
      return null;
    case "log":
      return `[${e.level || "log"}] ${e.text || ""}`;
    case "error":
      return `[error${e.code ? " " + e.code : ""}] ${e.text || ""}`;
    case "paused":
      return `paused${at}`;
    case "resumed":
      return `resumed${at}`;
    case "session_started":
      return `session started: project ${e.project}, run ${e.run_name || e.run_id}`;
    case "newRun": {
      const meta = e.meta || {};
      const from = e.parents && e.parents.length ? ` from ${e.parents.join(", ")}` : "";
      return `new run ${e.run_id}${from}${meta.kind ? ` (${meta.kind})` : ""}`;
    }
    case "epoch_end":
      return `epoch ${e.epoch} done${finite(e.val_loss) ? `  val ${fmtNum(e.val_loss)}` : ""}`;
    case "checkpoint_saved":
      return `checkpoint saved${at}: ${e.path || "(none written)"}`;
    case "checkpoint_loaded":
      return `checkpoint loaded${at}: ${e.path}`;
    case "test_complete":
      return `test '${e.label || ""}' finished${at}: avg loss ${fmtNum(e.avg_loss)}`;
    case "auto_test_complete":
      return null; // the same test as the test_complete just before it
    case "trainingFinished":
      return `training finished (${e.status || "?"})${at}`;
    case "runTransition":
      return `run ${e.from} -> ${e.to}`;
    case "hparams_changed":
      return `hyperparameters changed: ${JSON.stringify(e.changes || {})}`;
    case "artifact_created":
      return `exported ${e.rows} rows -> ${e.path}`;
    case "fork_budget_reached":
      return `fork ${e.run_id} spent its budget of ${e.steps} steps`;
    case "dashboard.connection":
      return e.connected ? "trainer connected" : "trainer disconnected";
    case "dashboard.process_exit":
      return `the script exited with code ${e.returncode}`;
    default: {
      const skip = new Set(["type", "run_id", "run_gen", "ts", "session_id", "event_seq"]);
      const rest = Object.entries(e)
        .filter(([k]) => !skip.has(k))
        .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`)
        .join("  ");
      return rest ? `${e.type}: ${rest.slice(0, 200)}` : String(e.type);
    }
  }
}

class Run {
  constructor(id, colorIndex) {
    this.id = id;
    this.colorIndex = colorIndex;
    this.parents = [];
    this.kind = "root";
    this.meta = {};
    this.branch = null; // {step, ts} where it left its first parent
    this.status = null; // from list_runs
    this.current = false;
    this.visible = true;
    this.trainSteps = 0;
    this.lastStep = null;
    this.metrics = {};
    for (const m of METRICS) this.metrics[m] = new Series();
    this.ema = { alpha: null, out: [], acc: 0, n: 0 };
  }
}

class Session {
  constructor(id) {
    this.id = id;
    this.project = null;
    this.runs = new Map();
    this.markers = [];
    this.lastStep = null;
    this.lastTs = null;
    this.currentRun = null;
  }

  run(id) {
    let run = this.runs.get(id);
    if (!run) {
      run = new Run(id, this.runs.size);
      this.runs.set(id, run);
    }
    return run;
  }
}

export class Store {
  constructor() {
    this.reset();
  }

  reset() {
    this.sessions = new Map();
    this.sessionOrder = [];
    this.viewSessionId = null; // null: follow the latest session
    this.trainerConnected = false;
    this.processExit = null;
    this.items = 0;
    this.trainerEvents = 0;
    this.lastSeq = new Map(); // session id -> last event_seq seen
    this.outOfOrder = 0;
    this.status = { runId: null, step: null, epoch: null, activity: "waiting", lr: null, weightDecay: null, sessionId: null };
    this.log = [];
    this.errors = [];
    this.version = 0; // bumped on every change, so views know when to redraw
    this.treeVersion = 0; // bumped when runs or their status change
    this.lastReport = null;
    this.scanProgress = null;
  }

  get latestSessionId() {
    return this.sessionOrder.length ? this.sessionOrder[this.sessionOrder.length - 1] : null;
  }

  get viewSession() {
    const id = this.viewSessionId || this.latestSessionId;
    return id ? this.sessions.get(id) : null;
  }

  session(id) {
    let s = this.sessions.get(id);
    if (!s) {
      s = new Session(id);
      this.sessions.set(id, s);
      this.sessionOrder.push(id);
      this.treeVersion++;
    }
    return s;
  }

  addLog(text, level, ts) {
    this.log.push({ text, level: level || "info", ts: ts || Date.now() / 1000 });
    if (this.log.length > LOG_KEEP * 1.25) this.log.splice(0, this.log.length - LOG_KEEP);
  }

  addError(code, message, source, ts) {
    this.errors.push({ code: code || "error", message: String(message), source: source || "run", ts: ts || Date.now() / 1000 });
    if (this.errors.length > ERRORS_KEEP) this.errors.splice(0, this.errors.length - ERRORS_KEEP);
    this.addLog(`[${code || "error"}] ${message}`, "error", ts);
  }

  /** Apply one history item (a trainer event or a dashboard.* item), in order. */
  apply(e) {
    this.items++;
    this.version++;
    if (e.type === "dashboard.connection") {
      this.trainerConnected = !!e.connected;
      this.addLog(describeEvent(e), e.connected ? "info" : "warn", e.ts);
      return;
    }
    if (e.type === "dashboard.process_exit") {
      this.processExit = e.returncode;
      this.trainerConnected = false;
      this.status.activity = `exited (${e.returncode})`;
      this.addLog(describeEvent(e), e.returncode === 0 ? "info" : "error", e.ts);
      return;
    }
    this.trainerEvents++;
    if (typeof e.event_seq === "number" && e.session_id) {
      const last = this.lastSeq.get(e.session_id) || 0;
      if (e.event_seq <= last) this.outOfOrder++;
      this.lastSeq.set(e.session_id, e.event_seq);
    }
    const line = describeEvent(e);
    if (e.type === "error") this.addError(e.code, e.text, "run", e.ts);
    else if (line !== null) this.addLog(line, e.type === "log" ? e.level : "info", e.ts);
    if (!e.session_id) return; // a note from the client engine: log only
    const session = this.session(e.session_id);
    if (typeof e.ts === "number") session.lastTs = e.ts;
    if (e.run_id && e.type !== "finalizeRun" && e.type !== "newRun") session.currentRun = e.run_id;
    if (session === this.viewSession && session.currentRun) this.status.runId = session.currentRun;
    const handler = this["on_" + e.type];
    if (handler) handler.call(this, session, e);
  }

  markStatus(session, fields) {
    if (session !== this.viewSession) return;
    Object.assign(this.status, fields);
  }

  marker(session, kind, e, step, label) {
    session.markers.push({ kind, step, ts: e.ts, run: e.run_id, label });
  }

  on_session_started(session, e) {
    session.project = e.project;
    this.markStatus(session, { sessionId: session.id, activity: "starting", step: null, epoch: null });
  }

  on_newRun(session, e) {
    const run = session.run(e.run_id);
    run.parents = Array.isArray(e.parents) ? e.parents.slice() : [];
    run.meta = e.meta || {};
    run.kind = run.meta.kind || (run.parents.length ? "child" : "root");
    session.currentRun = e.run_id;
    if (run.parents.length) {
      const step = finite(run.meta.at_step) ? run.meta.at_step : session.lastStep;
      run.branch = { step, ts: e.ts };
      if (run.kind === "merge") this.marker(session, "merge", e, step, `merge ${run.parents.join("+")} -> ${run.id}`);
      else this.marker(session, "fork", e, step, `fork ${run.parents[0]} -> ${run.id}`);
    }
    this.treeVersion++;
  }

  on_trainStep(session, e) {
    const run = session.run(e.run_id);
    const step = e.step;
    const ts = e.ts;
    run.trainSteps++;
    run.lastStep = step;
    session.lastStep = step;
    const m = run.metrics;
    if (finite(e.loss)) m.loss.push(step, ts, e.loss);
    if (finite(e.val_loss)) {
      const last = m.val_loss.last();
      if (!last || last.val !== e.val_loss) m.val_loss.push(step, ts, e.val_loss);
    }
    if (finite(e.lr)) m.lr.push(step, ts, e.lr);
    if (finite(e.grad_norm)) m.grad_norm.push(step, ts, e.grad_norm);
    if (finite(e.throughput)) m.throughput.push(step, ts, e.throughput);
    const fields = { step, runId: e.run_id };
    if (e.epoch !== undefined && e.epoch !== null) fields.epoch = e.epoch;
    if (finite(e.lr)) fields.lr = e.lr;
    if (this.status.activity === "waiting" || this.status.activity === "starting") fields.activity = "running";
    this.markStatus(session, fields);
  }

  on_epoch_end(session, e) {
    if (finite(e.val_loss)) {
      const run = session.run(e.run_id);
      const last = run.metrics.val_loss.last();
      const step = run.lastStep !== null ? run.lastStep : session.lastStep !== null ? session.lastStep : 0;
      if (!last || last.val !== e.val_loss) run.metrics.val_loss.push(step, e.ts, e.val_loss);
    }
    this.markStatus(session, { epoch: e.epoch });
  }

  on_paused(session, e) {
    this.marker(session, "pause", e, finite(e.step) ? e.step : session.lastStep, `paused at step ${e.step}`);
    this.markStatus(session, { activity: "paused", step: e.step });
  }

  on_resumed(session, e) {
    this.markStatus(session, { activity: "running", step: e.step });
  }

  on_trainingFinished(session, e) {
    this.markStatus(session, { activity: `finished (${e.status || "?"})`, step: e.step });
    this.treeVersion++;
  }

  on_stopping(session) {
    this.markStatus(session, { activity: "stopping" });
  }

  on_hparams_changed(session, e) {
    const step = session.run(e.run_id).lastStep;
    this.marker(session, "edit", e, step !== null ? step : 0, `hyperparameters: ${JSON.stringify(e.changes || {})}`);
    const groups = e.hparams && Array.isArray(e.hparams.param_groups) ? e.hparams.param_groups : [];
    if (groups.length) this.markStatus(session, { lr: groups[0].lr, weightDecay: groups[0].weight_decay ?? null });
  }

  on_test_complete(session, e) {
    const step = finite(e.step) ? e.step : session.lastStep;
    this.marker(session, "test", e, step, `test '${e.label}': avg loss ${fmtNum(e.avg_loss)}`);
  }

  on_runTransition(session, e) {
    session.currentRun = e.to;
    this.markStatus(session, { runId: e.to });
  }

  on_scan_progress(session, e) {
    this.scanProgress = { done: e.done, total: e.total };
  }

  /** Take a command's reply into account (status, list_runs, set_hparams). */
  applyReply(cmd, data) {
    this.version++;
    if (!data || typeof data !== "object") return;
    const session = this.viewSession;
    if (cmd === "list_runs" && Array.isArray(data.runs) && session) {
      for (const r of data.runs) {
        const run = session.run(r.run_id);
        run.status = r.status || null;
        run.current = !!r.current;
        if (Array.isArray(r.parents) && !run.parents.length) run.parents = r.parents.slice();
        if (r.kind) run.kind = r.kind;
      }
      this.treeVersion++;
    } else if (cmd === "status") {
      if (typeof data.paused === "boolean" && !String(this.status.activity).startsWith("finished")) {
        this.status.activity = data.paused ? "paused" : "running";
      }
      for (const [k, f] of [["run_id", "runId"], ["step", "step"], ["epoch", "epoch"]]) {
        if (data[k] !== undefined && data[k] !== null) this.status[f] = data[k];
      }
    } else if (cmd === "set_hparams" && Array.isArray(data.param_groups) && data.param_groups.length) {
      this.status.lr = data.param_groups[0].lr;
      this.status.weightDecay = data.param_groups[0].weight_decay ?? null;
    } else if (cmd === "pause" && data.status === "paused") {
      this.status.activity = "paused";
    } else if (cmd === "resume" && data.status === "resumed") {
      this.status.activity = "running";
    }
  }
}
