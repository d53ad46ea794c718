// The page's panels around the charts: status bar and buttons, the lr / weight-decay editor,
// the run tree (switch, show, select for merge), the merge form, errors and the log.

import { PALETTE } from "./charts.js";

const $ = (id) => document.getElementById(id);

function text(node, value) {
  const s = value === null || value === undefined ? "-" : String(value);
  if (node.textContent !== s) node.textContent = s;
}

function fmtTime(ts) {
  return new Date(ts * 1000).toLocaleTimeString();
}

export class Panels {
  /** `run(cmd, payload)` sends a command and reports failures; resolves with data or null. */
  constructor(store, charts, run) {
    this.store = store;
    this.charts = charts;
    this.run = run;
    this.treeVersion = -1;
    this.logShown = 0;
    this.errorsShown = 0;
    this.bindControls();
    this.bindHparams();
    this.bindMerge();
    $("st-session").addEventListener("change", (ev) => {
      this.store.viewSessionId = ev.target.value || null;
      this.treeVersion = -1;
      for (const p of this.charts.panels) p.signature = null;
      this.refresh();
      this.charts.schedule();
    });
  }

  bindControls() {
    const simple = [
      ["btn-pause", "pause", {}],
      ["btn-resume", "resume", {}],
      ["btn-test", "test_now", { label: "dashboard" }],
      ["btn-save", "save_ckpt", {}],
      ["btn-stop", "stop", {}],
    ];
    for (const [id, cmd, payload] of simple) {
      $(id).addEventListener("click", async () => {
        const button = $(id);
        if (cmd === "stop" && !this.armStop(button)) return; // a second click within 4 s stops
        button.disabled = true;
        try {
          const data = await this.run(cmd, payload);
          if (data !== null) this.store.applyReply(cmd, data);
          if (cmd === "save_ckpt" && data) this.store.addLog(data.path ? `checkpoint saved: ${data.path}` : "no checkpoint written (pause first)", "info");
          this.refresh();
        } finally {
          button.disabled = false;
        }
      });
    }
  }

  /** First click on Stop only arms it ("Confirm stop"); true when this click should send it. */
  armStop(button) {
    if (button.dataset.armed === "1") {
      clearTimeout(this.stopTimer);
      button.dataset.armed = "";
      button.textContent = "Stop";
      return true;
    }
    button.dataset.armed = "1";
    button.textContent = "Confirm stop";
    this.stopTimer = setTimeout(() => {
      button.dataset.armed = "";
      button.textContent = "Stop";
    }, 4000);
    return false;
  }

  bindHparams() {
    $("hparams").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const payload = {};
      const lr = $("hp-lr").value.trim();
      const wd = $("hp-wd").value.trim();
      if (lr !== "") payload.lr = Number(lr);
      if (wd !== "") payload.weight_decay = Number(wd);
      if (!Object.keys(payload).length) {
        this.store.addError("bad_input", "type a learning rate or a weight decay first", "page");
        this.refresh();
        return;
      }
      for (const [k, v] of Object.entries(payload)) {
        if (!Number.isFinite(v) || v < 0) {
          this.store.addError("bad_input", `${k} must be a number >= 0`, "page");
          this.refresh();
          return;
        }
      }
      const data = await this.run("set_hparams", payload);
      if (data !== null) {
        this.store.applyReply("set_hparams", data);
        $("hp-lr").value = "";
        $("hp-wd").value = "";
      }
      this.refresh();
    });
  }

  bindMerge() {
    $("merge-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const session = this.store.viewSession;
      const parents = session ? Array.from(session.runs.values()).filter((r) => r.selected).map((r) => r.id) : [];
      if (parents.length < 2) {
        this.store.addError("bad_input", "select at least two runs in the tree to merge", "page");
        this.refresh();
        return;
      }
      const payload = { parents, strategy: $("merge-strategy").value };
      const name = $("merge-name").value.trim();
      if (name) payload.new_name = name;
      const data = await this.run("merge", payload);
      if (data) {
        this.store.addLog(`merged ${parents.join(" + ")} (${payload.strategy}) -> ${data.new_run}`, "info");
        for (const r of session.runs.values()) r.selected = false;
        $("merge-name").value = "";
        this.treeVersion = -1;
        this.requestRuns();
      }
      this.refresh();
    });
  }

  async requestRuns() {
    const data = await this.run("list_runs", {}, { quiet: true });
    if (data) {
      this.store.applyReply("list_runs", data);
      this.refresh();
    }
  }

  refresh() {
    const s = this.store.status;
    const trainer = $("trainer-link");
    trainer.dataset.state = this.store.trainerConnected ? "on" : "off";
    text(trainer, this.store.trainerConnected ? "trainer: connected" : "trainer: not connected");
    text($("st-run"), s.runId);
    text($("st-step"), s.step);
    text($("st-epoch"), s.epoch);
    const act = $("st-activity");
    const state = String(s.activity).split(" ")[0];
    act.dataset.state = state;
    text(act, s.activity);
    $("hp-lr").placeholder = s.lr === null || s.lr === undefined ? "-" : String(s.lr);
    $("hp-wd").placeholder = s.weightDecay === null || s.weightDecay === undefined ? "-" : String(s.weightDecay);
    this.refreshSessions();
    if (this.treeVersion !== this.store.treeVersion) {
      this.treeVersion = this.store.treeVersion;
      this.renderTree();
    }
    this.renderErrors();
    this.renderLog();
  }

  refreshSessions() {
    const order = this.store.sessionOrder;
    $("st-session-wrap").hidden = order.length < 2;
    const select = $("st-session");
    if (select.options.length !== order.length + 1) {
      select.replaceChildren(new Option("latest", ""));
      for (const id of order) {
        const session = this.store.sessions.get(id);
        select.append(new Option(`${session.project || "?"} · ${id}`, id));
      }
      select.value = this.store.viewSessionId || "";
    }
  }

  renderTree() {
    const tree = $("run-tree");
    const session = this.store.viewSession;
    tree.replaceChildren();
    if (!session || !session.runs.size) {
      tree.append(Object.assign(document.createElement("li"), { className: "muted", textContent: "no runs yet" }));
      return;
    }
    const children = new Map();
    const roots = [];
    for (const run of session.runs.values()) {
      const parent = run.parents.find((p) => session.runs.has(p));
      if (parent) {
        if (!children.has(parent)) children.set(parent, []);
        children.get(parent).push(run);
      } else roots.push(run);
    }
    const add = (run, list) => {
      const li = document.createElement("li");
      li.dataset.run = run.id;
      const row = document.createElement("div");
      row.className = "run-row" + (run.id === session.currentRun ? " current" : "");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = PALETTE[run.colorIndex % PALETTE.length];
      const show = Object.assign(document.createElement("input"), { type: "checkbox", checked: run.visible, title: "show on the charts", className: "run-show" });
      show.addEventListener("change", () => {
        run.visible = show.checked;
        this.charts.schedule();
      });
      const pick = Object.assign(document.createElement("input"), { type: "checkbox", checked: !!run.selected, title: "select for merge", className: "run-select" });
      pick.addEventListener("change", () => {
        run.selected = pick.checked;
      });
      const name = Object.assign(document.createElement("span"), { className: "run-name", textContent: run.id });
      const extra = [];
      if (run.kind && run.kind !== "root") extra.push(run.kind);
      if (run.kind === "merge" && run.parents.length) extra.push(`of ${run.parents.join(" + ")}`);
      if (run.branch && run.branch.step !== null && run.kind !== "merge") extra.push(`@ step ${run.branch.step}`);
      if (run.status) extra.push(run.status);
      const meta = Object.assign(document.createElement("span"), { className: "run-meta muted", textContent: extra.join(" · ") });
      const sw = Object.assign(document.createElement("button"), { className: "small run-switch", textContent: "switch to", title: "switch_run: continue training this run" });
      sw.disabled = run.id === session.currentRun;
      sw.addEventListener("click", async () => {
        const data = await this.run("switch_run", { run_id: run.id });
        if (data) {
          this.store.addLog(`switched to ${data.run_id}${data.ckpt_path ? ` (from ${data.ckpt_path})` : ""}`, "info");
          this.requestRuns();
        }
        this.refresh();
      });
      row.append(swatch, show, pick, name, meta, sw);
      li.append(row);
      const kids = children.get(run.id);
      if (kids) {
        const ul = document.createElement("ul");
        for (const k of kids) add(k, ul);
        li.append(ul);
      }
      list.append(li);
    };
    for (const r of roots) add(r, tree);
  }

  renderErrors() {
    const box = $("errors");
    const errors = this.store.errors;
    if (this.errorsShown === errors.length) return;
    this.errorsShown = errors.length;
    box.hidden = errors.length === 0;
    box.replaceChildren();
    const close = Object.assign(document.createElement("button"), { className: "small", textContent: "clear" });
    close.addEventListener("click", () => {
      this.store.errors.length = 0;
      this.errorsShown = -1;
      this.renderErrors();
    });
    box.append(close);
    for (const e of errors.slice(-5).reverse()) {
      const line = document.createElement("div");
      line.className = "error-line";
      const code = Object.assign(document.createElement("code"), { textContent: e.code });
      line.append(code, ` ${e.message}`, Object.assign(document.createElement("span"), { className: "muted", textContent: `  ${e.source}, ${fmtTime(e.ts)}` }));
      box.append(line);
    }
  }

  renderLog() {
    const log = this.store.log;
    const box = $("log");
    const last = log.length ? log[log.length - 1] : null;
    const key = last ? `${log.length}:${last.ts}:${last.text}` : "";
    if (this.logShown === key) return;
    this.logShown = key;
    const stick = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    box.replaceChildren();
    for (const entry of log.slice(-200)) {
      const line = document.createElement("div");
      line.className = `log-line level-${entry.level}`;
      line.textContent = `${fmtTime(entry.ts)} ${entry.text}`;
      box.append(line);
    }
    if (stick) box.scrollTop = box.scrollHeight;
  }
}
