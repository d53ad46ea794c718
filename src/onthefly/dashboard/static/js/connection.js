// The page's one WebSocket to the dashboard server: ordered history items in, commands out.
// Reconnects by itself and resumes the stream where it stopped, so every item is applied once.

export class CommandError extends Error {
  constructor(cmd, code, message) {
    super(`${cmd} failed [${code}]: ${message}`);
    this.cmd = cmd;
    this.code = code;
    this.detail = message;
  }
}

export class Connection {
  /**
   * handlers: onHello(msg), onReset(), onItems(items, fromIndex), onState(state), onProtocolError(text).
   * state is "connecting", "live" or "reconnecting".
   */
  constructor(token, handlers) {
    this.token = token;
    this.h = handlers;
    this.instance = null;
    this.received = 0; // history items applied so far: the resume point
    this.nextId = 1;
    this.pending = new Map();
    this.state = "connecting";
    this.retryMs = 250;
    this.ws = null;
  }

  url() {
    const proto = location.protocol === "https:" ? "wss" : "ws";
    const q = new URLSearchParams({ token: this.token });
    if (this.instance) {
      q.set("instance", this.instance);
      q.set("from", String(this.received));
    }
    return `${proto}://${location.host}/ws?${q}`;
  }

  connect() {
    const ws = new WebSocket(this.url());
    this.ws = ws;
    ws.onopen = () => {
      this.retryMs = 250;
    };
    ws.onmessage = (ev) => {
      if (this.ws === ws) this.onMessage(ev.data);
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      for (const [, p] of this.pending) p.reject(new CommandError(p.cmd, "page_disconnected", "the page lost its connection to the dashboard server"));
      this.pending.clear();
      this.setState("reconnecting");
      setTimeout(() => this.connect(), this.retryMs);
      this.retryMs = Math.min(this.retryMs * 2, 4000);
    };
  }

  setState(state) {
    this.state = state;
    this.h.onState(state);
  }

  onMessage(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (err) {
      this.h.onProtocolError(`the server sent a frame that is not JSON: ${err}`);
      return;
    }
    if (msg.op === "events") {
      if (msg.from !== this.received) {
        // Never apply an item twice or skip one: start over from a clean slate.
        this.h.onProtocolError(`history out of step (expected item ${this.received}, got ${msg.from}); reloading it`);
        this.instance = null;
        this.received = 0;
        this.h.onReset();
        const old = this.ws;
        this.ws = null; // frames still in flight on it are ignored
        old.close();
        this.connect();
        return;
      }
      this.received += msg.items.length;
      this.h.onItems(msg.items, msg.from);
    } else if (msg.op === "reply") {
      const p = this.pending.get(msg.id);
      if (!p) return;
      this.pending.delete(msg.id);
      if (msg.ok) p.resolve(msg.data);
      else p.reject(new CommandError(msg.cmd, msg.code || "error", msg.error || "failed"));
    } else if (msg.op === "hello") {
      if (msg.reset || msg.instance !== this.instance) {
        if (this.received > 0 || msg.reset) this.h.onReset();
        this.received = msg.from;
      }
      this.instance = msg.instance;
      this.setState("live");
      this.h.onHello(msg);
    } else if (msg.op === "error") {
      this.h.onProtocolError(`[${msg.code}] ${msg.error}`);
    }
  }

  /** Send a command; resolves with the reply data, rejects with a CommandError (code + message). */
  command(cmd, payload = {}) {
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
        reject(new CommandError(cmd, "page_disconnected", "the page is not connected to the dashboard server"));
        return;
      }
      const id = this.nextId++;
      this.pending.set(id, { cmd, resolve, reject });
      this.ws.send(JSON.stringify({ op: "cmd", id, cmd, payload }));
    });
  }
}
