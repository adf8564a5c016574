/**
 * The options of [[connect]] and [[getPosition]], the token provider and the running
 * feed, as types.
 *
 * @module
 */

import type { PgfeedError } from "./errors.js";
import type { ChangeEvent, LiveEvent, Op, Position, ResetEvent, Row } from "./types.js";

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
