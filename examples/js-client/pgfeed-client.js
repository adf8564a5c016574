// pgfeed-client.js: a dependency-free client for a pgfeed gateway (an ES module for
// browsers; in Node 22+ pass `EventSource` if it is not global).
//
// It follows the fetch-then-subscribe pattern: take the head position, read your state
// through your own API, then stream from that position, so no change is missed or applied
// twice. It dedupes by position, refetches on `reset`, lets EventSource reconnect by itself
// (sending Last-Event-ID) after `shutdown` or a dropped connection, and reconnects with a
// fresh token when the gateway says `expired` or refuses a reconnect.
//
//   import { subscribe, applyChange } from "./pgfeed-client.js";
//   const rows = new Map();
//   const feed = subscribe({
//     gateway: "https://feed.example.com",
//     getToken: async () => (await (await fetch("/api/feed-token")).json()).token,
//     load: async () => (await fetch("/api/orders")).json(),
//     onSnapshot: (list) => { rows.clear(); for (const r of list) rows.set(keyOf({ id: r.id }), r); render(); },
//     onChange: (change) => { applyChange(rows, change); render(); },
//     onState: (state) => showState(state),
//   });
//   // later: feed.close();

/** The map key of a primary key object, such as `{"id": 42}` from `change.pk`. */
export function keyOf(pk) {
  return JSON.stringify(pk);
}

/**
 * Applies one `payload=full` change to `rows`, a Map from keyOf(pk) to the row: inserts
 * and updates store `new`, deletes remove the key, a truncate empties the map.
 */
export function applyChange(rows, change) {
  switch (change.op) {
    case "insert":
    case "update":
      rows.set(keyOf(change.pk), change.new);
      break;
    case "delete":
      rows.delete(keyOf(change.pk));
      break;
    case "truncate":
      rows.clear();
      break;
  }
  return rows;
}

/** How many recent positions are remembered to drop duplicates. */
const SEEN_LIMIT = 10000;

/**
 * Opens a live subscription. Options:
 *   gateway     base URL of the gateway, e.g. "https://feed.example.com" (required)
 *   getToken    async () => a JWT for the gateway; called at start, at expiry, after refusals
 *   load        async () => your state, read through your own API (called after the
 *               position is taken, and again on `reset`)
 *   onSnapshot  (state) => replace what you show with `state` (from `load`)
 *   onChange    (change) => apply one change; each arrives once, in commit order
 *   onState     (state, detail) => "connecting" | "live" | "reconnecting" | "closed"
 *   onPosition  (position) => the newest position seen (opaque string)
 *   params      extra query parameters: { tables, ops, filter, payload }
 *   EventSource, fetch   implementations to use (default: the global ones)
 * Returns { close(), position, state }.
 */
export function subscribe(options) {
  const {
    gateway,
    getToken,
    load = async () => null,
    onSnapshot = () => {},
    onChange = () => {},
    onState = () => {},
    onPosition = () => {},
    params = {},
  } = options;
  const ES = options.EventSource || globalThis.EventSource;
  const fetchFn = options.fetch || globalThis.fetch.bind(globalThis);
  const base = String(gateway).replace(/\/+$/, "");

  let token = null;
  let position = null; // newest position seen: where a reconnect resumes
  let state = null;
  let source = null; // the current EventSource
  let closed = false;
  let failures = 0; // refused or failed attempts since the last event
  let timer = null;
  let pending = null; // changes held back while `reset` refetches
  const seen = new Set();

  const setState = (next, detail) => {
    if (state === next && !detail) return;
    state = next;
    onState(next, detail);
  };
  const setPosition = (p) => {
    if (p && p !== position) {
      position = p;
      onPosition(p);
    }
  };
  const backoff = () => Math.min(30000, 250 * 2 ** Math.min(failures, 7)) * (0.5 + Math.random() / 2);
  const later = (fn) => {
    clearTimeout(timer);
    timer = setTimeout(fn, backoff());
  };

  // Fetch, then subscribe: the head position first, then the state, then the stream from
  // that position. Changes committed in between are replayed, and applying them again to
  // a state that already has them is harmless, since changes apply by primary key.
  async function start() {
    if (closed) return;
    setState(position === null ? "connecting" : "reconnecting", position === null ? undefined : "resynchronizing");
    try {
      token = await getToken();
      const res = await fetchFn(`${base}/v1/position`, {
        headers: { Authorization: `Bearer ${token}` },
      });
      if (!res.ok) throw new Error(`GET /v1/position answered ${res.status}`);
      const head = (await res.json()).position;
      const snapshot = await load();
      if (closed) return;
      seen.clear();
      setPosition(head);
      onSnapshot(snapshot);
      open(head);
    } catch (err) {
      failures += 1;
      setState(position === null ? "connecting" : "reconnecting", String(err.message || err));
      later(start);
    }
  }

  // Reconnects from the last position with a fresh token (after `expired`, or when the
  // gateway refused EventSource's own reconnect, e.g. with 401 for an expired token).
  async function renew() {
    if (closed) return;
    try {
      token = await getToken();
      if (!closed) open(position);
    } catch (err) {
      failures += 1;
      setState("reconnecting", String(err.message || err));
      later(renew);
    }
  }

  function open(from) {
    const query = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) {
      if (v !== undefined && v !== null && v !== "") query.set(k, Array.isArray(v) ? v.join(",") : v);
    }
    if (from) query.set("last_event_id", from);
    query.set("access_token", token);
    const es = new ES(`${base}/v1/stream?${query}`);
    source = es;
    const mine = (fn) => (e) => {
      if (source === es && !closed) fn(e);
    };

    es.addEventListener("change", mine((e) => {
      failures = 0;
      const change = JSON.parse(e.data);
      if (seen.has(change.position)) return; // a duplicate: already applied
      seen.add(change.position);
      if (seen.size > SEEN_LIMIT) seen.delete(seen.values().next().value);
      setPosition(change.position);
      if (pending) pending.push(change);
      else onChange(change);
    }));
    es.addEventListener("live", mine((e) => {
      failures = 0;
      setPosition(JSON.parse(e.data).position);
      setState("live");
    }));
    // Our position is older than the journal keeps: refetch the state, then go on from
    // the given position (the stream itself continues from there).
    es.addEventListener("reset", mine(async (e) => {
      failures = 0;
      setPosition(JSON.parse(e.data).position);
      setState("reconnecting", "refetching after reset");
      pending = [];
      for (;;) {
        try {
          const snapshot = await load();
          if (closed) return;
          onSnapshot(snapshot);
          break;
        } catch (err) {
          failures += 1;
          await new Promise((r) => setTimeout(r, backoff()));
        }
      }
      const held = pending;
      pending = null;
      held.forEach(onChange);
    }));
    // The gateway is stopping: EventSource reconnects by itself after `retry:` and sends
    // Last-Event-ID, to this replica once it is back or to another.
    es.addEventListener("shutdown", mine(() => setState("reconnecting", "gateway restarting")));
    // The token ran out: the same URL would be refused, so reconnect with a fresh one.
    es.addEventListener("expired", mine(() => {
      es.close();
      setState("reconnecting", "token expired");
      renew();
    }));
    es.onerror = mine(() => {
      if (es.readyState === ES.CONNECTING) {
        // A dropped connection: EventSource retries by itself.
        setState("reconnecting");
        return;
      }
      // Refused (401, 429, 503, ...): EventSource has given up, so we take over.
      es.close();
      failures += 1;
      setState("reconnecting", "refused; retrying");
      // After repeated refusals, start over: the position itself may be the problem
      // (e.g. the database was replaced).
      later(failures > 5 ? start : renew);
    });
  }

  start();

  return {
    /** Stops the subscription for good. */
    close() {
      closed = true;
      clearTimeout(timer);
      if (source) source.close();
      setState("closed");
    },
    /** The newest position seen. */
    get position() {
      return position;
    },
    /** The current connection state. */
    get state() {
      return state;
    },
  };
}
