/**
 * `connect()`: a live subscription to a pgfeed gateway that survives everything a long-lived
 * page meets. It streams over `fetch` (so the token travels in `Authorization` and the
 * position in `Last-Event-ID`), or over `EventSource` where `fetch` cannot stream; resumes
 * from the last position after any drop; asks the token provider again when the token
 * expires or is refused; takes the head position before `load` (fetch, then subscribe);
 * and surfaces `reset` (refetch your state) as a callback.
 *
 * @module
 */

import { PgfeedError, errorFromResponse } from "./errors.js";
import {
  asPgfeedError,
  endpoint,
  fetchPosition,
  guarded,
  list,
  requestHeaders,
  resolveToken,
} from "./gateway.js";
import type {
  EventSourceConstructor,
  Feed,
  FeedOptions,
  FeedStatus,
  TokenReason,
  Transport,
} from "./options.js";
import { SseParser } from "./sse.js";
import type { ChangeEvent, LiveEvent, Position, ResetEvent, Row } from "./types.js";

export { getPosition } from "./gateway.js";

/** How many recent positions are remembered to drop a duplicate. */
const SEEN_LIMIT = 10000;

/** How a stream ended without an error. */
type End = "eof" | "expired" | "shutdown";

/**
 * Opens a feed. It connects at once and keeps reconnecting (with backoff, from the last
 * position) until `close()`, or until the gateway refuses the request as such (a 400 or
 * 403: `feed.error`, `onError`, status `closed`).
 */
export function connect<R extends Row = Row, S = unknown>(options: FeedOptions<R, S>): Feed {
  const fetchImpl = options.fetch ?? globalThis.fetch;
  const ES = options.EventSource ?? (globalThis as { EventSource?: EventSourceConstructor }).EventSource;
  const canFetch = typeof fetchImpl === "function" && typeof ReadableStream !== "undefined";
  const transport: Transport =
    options.transport === "eventsource" || (options.transport !== "fetch" && !canFetch && ES)
      ? "eventsource"
      : "fetch";
  if (transport === "eventsource" && !ES) {
    throw new TypeError("@pgfeed/client: no EventSource: pass `EventSource` in the options");
  }
  if (transport === "fetch" && typeof fetchImpl !== "function") {
    throw new TypeError("@pgfeed/client: no fetch: pass `fetch` in the options");
  }
  const initialDelay = options.retry?.initial ?? 1000;
  const maxDelay = options.retry?.max ?? 30000;
  const staleAfter = options.staleAfter ?? 45000;

  let status: FeedStatus = "connecting";
  let position: Position | undefined = options.from;
  let error: PgfeedError | undefined;
  let closed = false;
  let token: string | null | undefined;
  let tokenReason: TokenReason | null = "initial";
  let tokenError: PgfeedError | undefined;
  let needLoad = options.from === undefined && options.load !== undefined;
  let serverRetry = initialDelay;
  let failures = 0;
  let pending: ChangeEvent<R>[] | null = null; // changes held while a reset reloads
  let resetting: Promise<void> = Promise.resolve();
  let resets = 0; // resets still reloading
  const seen = new Set<Position>();
  let abortCurrent: (() => void) | null = null;
  let wake: (() => void) | null = null;
  let resolveReady!: (event: LiveEvent) => void;
  let rejectReady!: (err: unknown) => void;
  const ready = new Promise<LiveEvent>((resolve, reject) => {
    resolveReady = resolve;
    rejectReady = reject;
  });
  ready.catch(() => {});

  const setStatus = (next: FeedStatus, err?: PgfeedError) => {
    if (next === status && !err) return;
    status = next;
    guarded(options.onStatus, next, err);
  };
  const report = (err: PgfeedError) => {
    error = err;
    guarded(options.onError, err);
  };
  const sleep = (ms: number) =>
    new Promise<void>((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        wake = null;
        resolve();
      }
      wake = done;
    });
  const backoff = (err?: PgfeedError) => {
    const base = Math.min(maxDelay, serverRetry * 2 ** Math.max(0, failures - 1));
    const delay = base * (0.5 + Math.random() / 2);
    return Math.max(delay, (err?.retryAfter ?? 0) * 1000);
  };

  async function reload(): Promise<void> {
    if (!options.load) return;
    let snapshot: S;
    try {
      snapshot = await options.load();
    } catch (cause) {
      throw new PgfeedError("load", `load failed: ${String(cause)}`, { cause });
    }
    if (!closed) guarded(options.onSnapshot, snapshot);
  }

  // The stream says our position is gone: hold changes back, let the user refetch, then
  // let them through.
  function reset(event: ResetEvent): Promise<void> {
    position = event.position;
    seen.clear();
    pending = pending ?? [];
    resets += 1;
    const previous = resetting;
    resetting = (async () => {
      await previous;
      try {
        await options.onReset?.(event);
      } catch (err) {
        setTimeout(() => {
          throw err;
        });
      }
      for (;;) {
        try {
          await reload();
          break;
        } catch (err) {
          if (closed) return;
          failures += 1;
          report(asPgfeedError(err));
          await sleep(backoff());
        }
      }
      // Changes wait until the last of overlapping resets has reloaded.
      resets -= 1;
      if (resets > 0) return;
      const held = pending ?? [];
      pending = null;
      for (const change of held) if (!closed) guarded(options.onChange, change);
    })();
    return resetting;
  }

  // One event from either transport; returns how the stream ends, if it does.
  function handle(name: string, text: string): End | undefined {
    if (closed) return undefined;
    if (name !== "change" && name !== "live" && name !== "reset" && name !== "expired" && name !== "shutdown") {
      return undefined;
    }
    let data: { position?: unknown };
    try {
      data = JSON.parse(text);
    } catch {
      report(new PgfeedError("bad_response", `an \`${name}\` event whose data is not JSON`));
      return undefined;
    }
    if (!data || typeof data.position !== "string") {
      report(new PgfeedError("bad_response", `an \`${name}\` event without a position`));
      return undefined;
    }
    switch (name) {
      case "change": {
        const change = data as ChangeEvent<R>;
        if (seen.has(change.position)) return undefined;
        seen.add(change.position);
        if (seen.size > SEEN_LIMIT) seen.delete(seen.values().next().value as Position);
        position = change.position;
        if (pending) pending.push(change);
        else guarded(options.onChange, change);
        return undefined;
      }
      case "live": {
        const live = data as LiveEvent;
        position = live.position;
        failures = 0;
        error = undefined;
        setStatus("live");
        guarded(options.onLive, live);
        resolveReady(live);
        return undefined;
      }
      case "reset":
        void reset(data as ResetEvent);
        return undefined;
      case "expired":
        position = data.position as Position;
        return "expired";
      default:
        position = data.position as Position;
        return "shutdown";
    }
  }

  function streamUrl(withToken: boolean): string {
    const query = new URLSearchParams();
    const tables = list(options.tables);
    const ops = list(options.ops);
    if (tables) query.set("tables", tables);
    if (ops) query.set("ops", ops);
    const filters = options.filter === undefined ? [] : typeof options.filter === "string" ? [options.filter] : options.filter;
    for (const f of filters) query.append("filter", f);
    if (options.payload) query.set("payload", options.payload);
    if (withToken) {
      if (position) query.set("last_event_id", position);
      if (token) query.set("access_token", token);
    }
    const q = query.toString();
    return endpoint(options.url, "/v1/stream") + (q ? `?${q}` : "");
  }

  async function streamFetch(): Promise<End> {
    const controller = new AbortController();
    let stale: ReturnType<typeof setTimeout> | undefined;
    let staleError: PgfeedError | undefined;
    const arm = () => {
      if (!staleAfter) return;
      clearTimeout(stale);
      stale = setTimeout(() => {
        staleError = new PgfeedError("network", `nothing arrived for ${staleAfter} ms`);
        controller.abort();
      }, staleAfter);
    };
    abortCurrent = () => controller.abort();
    const headers = requestHeaders(options, token);
    headers.Accept = "text/event-stream";
    if (position) headers["Last-Event-ID"] = position;
    try {
      arm();
      const response = await (fetchImpl as typeof fetch)(streamUrl(false), {
        headers,
        credentials: options.credentials,
        cache: "no-store",
        signal: controller.signal,
      });
      if (!response.ok) throw await errorFromResponse(response);
      const type = response.headers.get("content-type") ?? "";
      if (!type.startsWith("text/event-stream") || !response.body) {
        throw new PgfeedError("bad_response", `expected text/event-stream, got ${type || "no body"}`, {
          status: response.status,
        });
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let end: End | undefined;
      const parser = new SseParser(
        (m) => {
          end = end ?? handle(m.event, m.data);
        },
        (ms) => {
          serverRetry = ms;
        },
      );
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return "eof";
        arm();
        parser.push(decoder.decode(value, { stream: true }));
        if (end) {
          void reader.cancel().catch(() => {});
          return end;
        }
      }
    } catch (err) {
      throw staleError ?? asPgfeedError(err);
    } finally {
      clearTimeout(stale);
      abortCurrent = null;
      controller.abort();
    }
  }

  function streamEventSource(): Promise<End> {
    return new Promise<End>((resolve, reject) => {
      const es = new (ES as EventSourceConstructor)(streamUrl(true), {
        withCredentials: options.credentials === "include",
      });
      let settled = false;
      const finish = (end: End | PgfeedError) => {
        if (settled) return;
        settled = true;
        abortCurrent = null;
        es.close();
        if (end instanceof PgfeedError) reject(end);
        else resolve(end);
      };
      abortCurrent = () => finish("eof");
      for (const name of ["change", "live", "reset", "expired", "shutdown"]) {
        es.addEventListener(name, (e) => {
          if (settled) return;
          const end = handle(name, e.data);
          if (end) finish(end);
        });
      }
      // EventSource hides the status: ask /v1/position, which authenticates the same way,
      // what is wrong (an expired or refused token, say); else it was the network.
      es.onerror = () => {
        if (settled) return;
        es.close();
        const probe = typeof fetchImpl === "function" ? fetchPosition(options, token) : Promise.resolve("");
        probe.then(
          () => finish(new PgfeedError("network", "the EventSource connection failed")),
          (err) => finish(asPgfeedError(err)),
        );
      };
    });
  }

  async function run(): Promise<void> {
    while (!closed) {
      let err: PgfeedError | undefined;
      try {
        if (tokenReason) {
          token = await resolveToken(options.token, { reason: tokenReason, error: tokenError });
          tokenReason = null;
          tokenError = undefined;
        }
        if (closed) return;
        if (needLoad) {
          const head = await fetchPosition(options, token);
          await reload();
          position = head;
          seen.clear();
          needLoad = false;
        }
        if (closed) return;
        await resetting;
        const end = transport === "fetch" ? await streamFetch() : await streamEventSource();
        if (closed) return;
        if (end === "expired") {
          tokenReason = "expired";
          setStatus("reconnecting");
          continue;
        }
        setStatus("reconnecting");
      } catch (e) {
        err = asPgfeedError(e);
      }
      if (closed) return;
      if (err) {
        report(err);
        if (err.code === "unknown_position") {
          // Not a position of this database (it was replaced): start over from its head.
          try {
            const head = await fetchPosition(options, token);
            await reset({ reason: "unknown_position", position: head });
            continue;
          } catch (e) {
            err = asPgfeedError(e);
            report(err);
          }
        }
        if (err.fatal || (err.auth && typeof options.token !== "function")) {
          stop(err);
          return;
        }
        if (err.auth) {
          tokenReason = err.code === "token_expired" ? "expired" : "refused";
          tokenError = err;
        }
        failures += 1;
        setStatus(status === "connecting" ? "connecting" : "reconnecting", err);
      }
      await sleep(backoff(err));
    }
  }

  function stop(err?: PgfeedError) {
    if (closed) return;
    closed = true;
    if (err) error = err;
    abortCurrent?.();
    wake?.();
    setStatus("closed", err);
    rejectReady(err ?? new PgfeedError("network", "the feed was closed"));
  }

  if (options.signal) {
    if (options.signal.aborted) queueMicrotask(() => stop());
    else options.signal.addEventListener("abort", () => stop(), { once: true });
  }
  void run();

  return {
    get status() {
      return status;
    },
    get position() {
      return position;
    },
    get error() {
      return error;
    },
    transport,
    ready,
    close: () => stop(),
  };
}
