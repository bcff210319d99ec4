// rls-relay browser client (protocol v1). A plain ES module, no build step:
//
//   import { RelayClient } from "https://relay.example.com/client.js";
//   const relay = new RelayClient({
//     url: "wss://relay.example.com/ws",
//     getToken: async () => (await fetch("/api/relay-token", { method: "POST" })).json().then((r) => r.token),
//     subscriptions: [{ tables: ["positions", "orders", "balances"] }],
//     onEvent: (event) => store.apply(event),          // position_update, order_update, …
//     onResync: () => store.refetchOverRest(),          // events may have been missed
//   });
//   relay.start();
//
// What it does for you:
// - authenticates with a first {"type":"auth"} message (the token never goes in a URL);
// - refreshes the token before it expires ({"type":"auth"} again, answered `authenticated`);
// - reconnects with exponential backoff and jitter, and resumes each subscription with
//   `since` = the id of the last event received, so nothing is missed within the relay's
//   retention window; duplicates around a resume are dropped by id;
// - per close code: 4001 → a new token, then reconnect; 1001/1006/1011/4008/4029 →
//   reconnect and resume; 1008 (origin) and 1009 (message too large) → stop, since
//   retrying cannot help;
// - `resume_gap` (the cursor is older than the retention), or a reconnect before any
//   event gave a cursor: subscribes again without `since` and, once that subscription
//   is live, calls onResync, so the application refetches its state over REST with
//   nothing falling between the two.
//
// Events of different rows may arrive slightly out of id order (ids are taken before
// commit): apply each row event as the row's newest state, or compare the row's own
// version column.

const FATAL_CODES = new Set([1008, 1009]);

export class RelayClient {
  /**
   * @param {object} options
   * @param {string} [options.url] WebSocket URL; default: /ws on the page's host.
   * @param {() => Promise<string>} options.getToken A fresh JWT for the current user.
   * @param {object[]} [options.subscriptions] subscribe requests without type/ref/since
   *   (e.g. {tables: ["positions"]}); default: one subscription to everything visible.
   * @param {(event: object) => void} [options.onEvent] every event, once.
   * @param {(why: string) => void} [options.onResync] refetch over REST: events may be missing.
   * @param {(status: string, detail?: object) => void} [options.onStatus]
   *   connecting | authenticating | live | reconnecting | stopped | failed
   * @param {(message: object) => void} [options.onMessage] every non-event message (debugging).
   * @param {number} [options.initialBackoffMs=500]
   * @param {number} [options.maxBackoffMs=30000]
   * @param {number} [options.refreshMarginMs=30000] refresh this long before expiry (at the
   *   latest at half of the token's remaining life).
   */
  constructor(options) {
    if (typeof options?.getToken !== "function") throw new TypeError("getToken is required");
    this.url = options.url ?? defaultUrl();
    this.getToken = options.getToken;
    this.subscriptions = (options.subscriptions ?? [{}]).map((s) => ({ ...s }));
    this.onEvent = options.onEvent ?? (() => {});
    this.onResync = options.onResync ?? (() => {});
    this.onStatus = options.onStatus ?? (() => {});
    this.onMessage = options.onMessage ?? (() => {});
    this.initialBackoffMs = options.initialBackoffMs ?? 500;
    this.maxBackoffMs = options.maxBackoffMs ?? 30_000;
    this.refreshMarginMs = options.refreshMarginMs ?? 30_000;

    /** Id of the last event received: the resume cursor. */
    this.lastEventId = null;
    this.userId = null;
    this.connectionId = null;
    this.expiresAt = null;

    this._ws = null;
    this._stopped = true;
    this._attempt = 0;
    this._wasLive = false;
    this._refs = 0;
    this._pending = new Map(); // ref → subscription index, while waiting for `subscribed`
    this._resyncAfter = new Set(); // refs whose `subscribed` calls onResync (after a resume_gap)
    this._seen = new Set(); // recent event ids, to drop duplicates around a resume
    this._seenOrder = [];
    this._timers = new Set();
    this._refreshTimer = null;
  }

  /** Connects (and keeps reconnecting until stop()). */
  start() {
    if (!this._stopped) return;
    this._stopped = false;
    this._connect();
  }

  /** Closes for good (close code 1000); no reconnect. */
  stop() {
    this._stopped = true;
    this._clearTimers();
    if (this._ws) {
      this._ws.onclose = null;
      this._ws.close(1000, "client stopped");
      this._ws = null;
    }
    this.onStatus("stopped");
  }

  /** Drops the socket as a network failure would (demo and tests): reconnects and resumes. */
  drop() {
    if (this._ws) this._ws.close(4000, "dropped by the client");
  }

  async _connect() {
    this._clearTimers();
    this.onStatus("connecting", { attempt: this._attempt });
    let token;
    try {
      token = await this.getToken();
    } catch (error) {
      this._scheduleReconnect({ reason: `no token: ${error}` });
      return;
    }
    if (this._stopped) return;
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (error) {
      this._scheduleReconnect({ reason: String(error) });
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      this.onStatus("authenticating");
      ws.send(JSON.stringify({ type: "auth", token }));
    };
    ws.onmessage = (message) => this._onMessage(ws, message);
    ws.onclose = (close) => this._onClose(ws, close);
    ws.onerror = () => {}; // a close event follows
  }

  _onMessage(ws, { data }) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    if (typeof message.id === "number" && typeof message.op === "string") {
      this._onEvent(message);
      return;
    }
    this.onMessage(message);
    switch (message.type) {
      case "welcome":
        this.userId = message.user_id;
        this.connectionId = message.connection_id;
        this._expiring(message.expires_at);
        this._subscribeAll(ws);
        break;
      case "authenticated":
        this._expiring(message.expires_at);
        break;
      case "subscribed":
        if (this._resyncAfter.delete(refOf(message))) {
          // Live now: a refetch from here on leaves nothing between the two.
          this.onResync("resume_gap");
        }
        if (this._pending.delete(refOf(message)) && this._pending.size === 0) {
          this._attempt = 0;
          const resync = this._wasLive && this.lastEventId === null;
          this._wasLive = true;
          this.onStatus("live", { userId: this.userId, connectionId: this.connectionId });
          if (resync) this.onResync("reconnected before any event gave a resume cursor");
        }
        break;
      case "error":
        this._onError(ws, message);
        break;
    }
  }

  _onEvent(event) {
    if (this._seen.has(event.id)) return; // a duplicate around a resume: same id
    this._seen.add(event.id);
    this._seenOrder.push(event.id);
    if (this._seenOrder.length > 10_000) this._seen.delete(this._seenOrder.shift());
    // The highest id, not the last: ids commit slightly out of order, and a resume from
    // the highest also looks back for whatever committed late below it.
    this.lastEventId = this.lastEventId === null ? event.id : Math.max(this.lastEventId, event.id);
    this.onEvent(event);

  }

  _onError(ws, message) {
    const ref = refOf(message);
    if (message.code === "resume_gap" && this._pending.has(ref)) {
      // Too far behind: live from now on, and the application refetches its state.
      const index = this._pending.get(ref);
      this._pending.delete(ref);
      this._resyncAfter.add(this._subscribe(ws, index, false));
    } else if (message.code === "unauthorized" && ref?.startsWith("refresh-")) {
      // A refresh was refused: reconnect with a new token before this one expires.
      ws.close(4000, "token refresh refused");
    } else if (this._pending.has(ref)) {
      this._pending.delete(ref);
      this.onStatus("failed", { code: message.code, message: message.message });
    }
  }

  _subscribeAll(ws) {
    this._pending.clear();
    this._resyncAfter.clear();
    this.subscriptions.forEach((_, index) => this._subscribe(ws, index, true));
  }

  _subscribe(ws, index, resume) {
    const ref = `sub-${++this._refs}`;
    const request = { ...this.subscriptions[index], type: "subscribe", ref };
    if (resume && this.lastEventId !== null) request.since = this.lastEventId;
    this._pending.set(ref, index);
    ws.send(JSON.stringify(request));
    return ref;
  }

  _expiring(expiresAt) {
    this.expiresAt = expiresAt ? Date.parse(expiresAt) : null;
    if (this._refreshTimer) this._clear(this._refreshTimer);
    if (!this.expiresAt) return;
    const left = this.expiresAt - Date.now();
    const delay = Math.max(1000, Math.min(left - this.refreshMarginMs, left / 2));
    this._refreshTimer = this._after(delay, () => this._refresh());
  }

  async _refresh() {
    const ws = this._ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    try {
      const token = await this.getToken();
      if (ws.readyState === WebSocket.OPEN) {
        ws.send(JSON.stringify({ type: "auth", token, ref: `refresh-${++this._refs}` }));
      }
    } catch {
      // Try again shortly; the socket lives until its token's expiry (plus leeway).
      this._refreshTimer = this._after(5000, () => this._refresh());
    }
  }

  _onClose(ws, close) {
    if (ws !== this._ws) return;
    this._ws = null;
    this._clearTimers();
    const detail = { code: close.code, reason: close.reason };
    if (this._stopped) return;
    if (FATAL_CODES.has(close.code)) {
      this._stopped = true;
      this.onStatus("failed", detail);
      return;
    }
    // 4001: _connect asks getToken for a new token anyway. 1001 (shutdown, ping
    // timeout), 1006 (network), 1011 (visibility unavailable), 4008 (slow consumer),
    // 4029 (too many) and anything else: reconnect, with backoff, and resume.
    this._scheduleReconnect(detail);
  }

  _scheduleReconnect(detail) {
    if (this._stopped) return;
    // Exponential backoff with "equal jitter": half fixed, half random, so a relay
    // restart is not followed by every client reconnecting in the same millisecond.
    const ceiling = Math.min(this.maxBackoffMs, this.initialBackoffMs * 2 ** this._attempt);
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this._attempt += 1;
    this.onStatus("reconnecting", { ...detail, delayMs: Math.round(delay), attempt: this._attempt });
    this._after(delay, () => this._connect());
  }

  _after(ms, f) {
    const timer = setTimeout(() => {
      this._timers.delete(timer);
      f();
    }, ms);
    this._timers.add(timer);
    return timer;
  }

  _clear(timer) {
    clearTimeout(timer);
    this._timers.delete(timer);
  }

  _clearTimers() {
    for (const timer of this._timers) clearTimeout(timer);
    this._timers.clear();
    this._refreshTimer = null;
  }
}

function refOf(message) {
  return message.ref === undefined || message.ref === null ? null : String(message.ref);
}

function defaultUrl() {
  const { protocol, host } = window.location;
  return `${protocol === "https:" ? "wss:" : "ws:"}//${host}/ws`;
}
