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
import { SseParser } from "./sse.js";
import type {
  ChangeEvent,
  LiveEvent,
  Op,
  Position,
  ResetEvent,
  Row,
} from "./types.js";

/** Why the token provider is called: the first connection, an expiry, or a refusal. */
export type TokenReason = "initial" | "expired" | "refused";

/** What the token provider is told. */
export interface TokenContext {
  reason: TokenReason;
  /** The gateway's refusal, for `expired` after a 401 and for `refused`. */
  error?: PgfeedError;
}

/**
 * Returns a token for the gateway (a JWT), or nothing when the gateway authenticates
 * otherwise (a cookie, a trusted header). Called at start and whenever the token expired
 * or was refused; between those, the last token is reused.
 */
export type TokenProvider = (
  context: TokenContext,
) => string | null | undefined | Promise<string | null | undefined>;

/** The state of a feed. */
export type FeedStatus = "connecting" | "live" | "reconnecting" | "closed";

/** The transport a feed streams over. */
export type Transport = "fetch" | "eventsource";

/** The part of `EventSource` the client uses (the browser's, or a polyfill). */
export interface EventSourceLike {
  readonly readyState: number;
  addEventListener(type: string, listener: (event: { data: string; lastEventId?: string }) => void): void;
  onerror: ((event: unknown) => void) | null;
  onopen: ((event: unknown) => void) | null;
  close(): void;
}

/** A constructor of [[EventSourceLike]]. */
export type EventSourceConstructor = new (
  url: string,
  init?: { withCredentials?: boolean },
) => EventSourceLike;

/** How to reach the gateway: shared by [[connect]] and [[getPosition]]. */
export interface GatewayOptions {
  /** The gateway's base URL, e.g. `https://feed.example.com` (a path prefix is kept). */
  url: string | URL;
  /** A fixed token, or a provider called again when it expires or is refused. */
  token?: string | TokenProvider;
  /** Extra request headers (fetch transport), e.g. `X-Tenant-Id` behind your own proxy. */
  headers?: Record<string, string>;
  /** `fetch`'s `credentials`, e.g. `"include"` for a cookie (`auth.cookie`) cross-origin. */
  credentials?: RequestCredentials;
  /** The `fetch` to use (default: the global one). */
  fetch?: typeof fetch;
}

/** What to stream and what to call. `R` is the row type, `S` what `load` returns. */
export interface FeedOptions<R extends Row = Row, S = unknown> extends GatewayOptions {
  /** Tables (`orders` or `public.orders`); default every table the token may see. */
  tables?: string | readonly string[];
  /** Operations; default all. */
  ops?: Op | readonly Op[];
  /** Row filters, `<table>:<column>=<op>.<value>`, ANDed. */
  filter?: string | readonly string[];
  /** `full` (default) sends rows; `keys` sends `pk` and `changed` only. */
  payload?: "full" | "keys";
  /** Start after this position (one you kept); default: from now, or the head before `load`. */
  from?: Position;
  /**
   * Reads your state through your own API. Called after the head position was taken (so
   * nothing committed meanwhile is missed: those changes are replayed; apply by primary
   * key) and again after a `reset`; its result goes to `onSnapshot`.
   */
  load?: () => S | Promise<S>;
  /** Replace what you show with `snapshot` (from `load`). */
  onSnapshot?: (snapshot: S) => void;
  /** One change; each arrives once, in commit order (held back while a reset reloads). */
  onChange?: (change: ChangeEvent<R>) => void;
  /**
   * The position was not in the journal any more (or not from this database): refetch your
   * state. Awaited (changes wait meanwhile), then `load` is called if given.
   */
  onReset?: (event: ResetEvent) => void | Promise<void>;
  /** The stream caught up and is live (after every connection). */
  onLive?: (event: LiveEvent) => void;
  /** The status changed; `error` says why a connection was lost. */
  onStatus?: (status: FeedStatus, error?: PgfeedError) => void;
  /** Every error, the retried ones included. */
  onError?: (error: PgfeedError) => void;
  /** `fetch` (default where it can stream) or `eventsource` (token in the URL). */
  transport?: Transport | "auto";
  /** The `EventSource` to use (default: the global one). */
  EventSource?: EventSourceConstructor;
  /** Reconnect delays in ms: the first (until the gateway's `retry:` says), and the cap. */
  retry?: { initial?: number; max?: number };
  /** Reconnect when nothing (not even a keep-alive) arrived for this long, in ms; 0: never. */
  staleAfter?: number;
  /** Aborting it closes the feed. */
  signal?: AbortSignal;
}

/** A running subscription. */
export interface Feed {
  /** The current status. */
  readonly status: FeedStatus;
  /** The newest position seen: where a reconnect resumes. */
  readonly position: Position | undefined;
  /** The error that stopped the feed, or the last one it retried. */
  readonly error: PgfeedError | undefined;
  /** The transport in use. */
  readonly transport: Transport;
  /** Resolves at the first `live`; rejects if the feed stops before. */
  readonly ready: Promise<LiveEvent>;
  /** Stops the feed for good. */
  close(): void;
}

/** How many recent positions are remembered to drop a duplicate. */
const SEEN_LIMIT = 10000;

/** `url` without trailing slashes, with `path` appended. */
function endpoint(url: string | URL, path: string): string {
  return `${String(url).replace(/\/+$/, "")}${path}`;
}

function list(value: string | readonly string[] | undefined): string | undefined {
  if (value === undefined) return undefined;
  const text = typeof value === "string" ? value : value.join(",");
  return text === "" ? undefined : text;
}

function fetchOf(options: GatewayOptions): typeof fetch {
  const f = options.fetch ?? globalThis.fetch;
  if (typeof f !== "function") {
    throw new PgfeedError("network", "no fetch: pass `fetch` in the options");
  }
  return options.fetch ? f : f.bind(globalThis);
}

function requestHeaders(options: GatewayOptions, token: string | null | undefined): Record<string, string> {
  const headers: Record<string, string> = { ...options.headers };
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

async function resolveToken(
  token: GatewayOptions["token"],
  context: TokenContext,
): Promise<string | null | undefined> {
  if (typeof token !== "function") return token;
  try {
    return await token(context);
  } catch (cause) {
    throw new PgfeedError("token_provider", `the token provider failed: ${String(cause)}`, { cause });
  }
}

function asPgfeedError(err: unknown): PgfeedError {
  if (err instanceof PgfeedError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new PgfeedError("network", message || "the connection failed", { cause: err });
}

/** Runs a callback of the user's: what it throws is reported, never breaks the feed. */
function guarded<A extends unknown[]>(fn: ((...args: A) => unknown) | undefined, ...args: A): void {
  if (!fn) return;
  try {
    fn(...args);
  } catch (err) {
    setTimeout(() => {
      throw err;
    });
  }
}

/** `GET /v1/position` with `token`. */
async function fetchPosition(options: GatewayOptions, token: string | null | undefined): Promise<Position> {
  let response: Response;
  try {
    response = await fetchOf(options)(endpoint(options.url, "/v1/position"), {
      headers: requestHeaders(options, token),
      credentials: options.credentials,
      cache: "no-store",
    });
  } catch (err) {
    throw asPgfeedError(err);
  }
  if (!response.ok) throw await errorFromResponse(response);
  const body = (await response.json().catch(() => null)) as { position?: unknown } | null;
  if (!body || typeof body.position !== "string" || body.position === "") {
    throw new PgfeedError("bad_response", "GET /v1/position answered no position", {
      status: response.status,
    });
  }
  return body.position;
}

/**
 * The gateway's head position (`GET /v1/position`), for fetch-then-subscribe by hand: take
 * it, read your state, then `connect({ ..., from: position })`.
 */
export async function getPosition(options: GatewayOptions): Promise<Position> {
  const token = await resolveToken(options.token, { reason: "initial" });
  return fetchPosition(options, token);
}

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
