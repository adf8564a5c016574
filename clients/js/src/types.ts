/**
 * The events of a pgfeed stream and the errors of its HTTP API, as typed values
 * (api/change.schema.json, api/control.schema.json and api/openapi.json in the repository
 * describe the same shapes).
 *
 * @module
 */

/** An opaque position in the journal; positions increase in commit order. */
export type Position = string;

/** The kind of a change. */
export type Op = "insert" | "update" | "delete" | "truncate";

/** Columns and values, exactly as PostgreSQL's `to_jsonb` renders them. */
export type Row = Record<string, unknown>;

/** What every change carries. */
interface ChangeCommon {
  /** Its position: give it back (as the client does by itself) to resume after it. */
  position: Position;
  /** The table, always schema-qualified (`public.orders`). */
  table: string;
  /** Commit time, RFC 3339 in UTC with microseconds. */
  committed_at: string;
}

/** A row inserted. `new` is absent with `payload: "keys"`. */
export interface InsertChange<R extends Row = Row> extends ChangeCommon {
  op: "insert";
  /** The row's tenant; absent for a public table. */
  tenant?: string;
  pk: Row;
  new?: R;
}

/** A row updated (an update that changes no column sends nothing). */
export interface UpdateChange<R extends Row = Row> extends ChangeCommon {
  op: "update";
  tenant?: string;
  /** The primary key of the new row. */
  pk: Row;
  new?: R;
  /** The whole row before the change. */
  old?: R;
  /** The columns the update changed, sorted by name. */
  changed: string[];
}

/** A row deleted. */
export interface DeleteChange<R extends Row = Row> extends ChangeCommon {
  op: "delete";
  tenant?: string;
  pk: Row;
  old?: R;
}

/** A table truncated: every row of it is gone (no tenant, no key, no row). */
export interface TruncateChange extends ChangeCommon {
  op: "truncate";
}

/** One row change (`event: change`), typed by its `op`. `R` is the row type you expect. */
export type ChangeEvent<R extends Row = Row> =
  | InsertChange<R>
  | UpdateChange<R>
  | DeleteChange<R>
  | TruncateChange;

/** `event: live`: everything older than the connection was replayed; changes are live now. */
export interface LiveEvent {
  position: Position;
}

/**
 * `event: reset`: the position asked for is no longer in the journal (older than it keeps,
 * from a reinstalled journal or another database): refetch your state; the stream goes on
 * from `position`.
 */
export interface ResetEvent {
  reason: string;
  position: Position;
}

/** `event: expired`: the token expired and the stream ended; the client reconnects with a fresh one. */
export interface ExpiredEvent {
  reason: string;
  position: Position;
}

/** `event: shutdown`: the gateway is stopping; the client reconnects (to another replica). */
export interface ShutdownEvent {
  reason: string;
  position: Position;
}

/** The control events by their SSE `event:` name. */
export interface ControlEvents {
  live: LiveEvent;
  reset: ResetEvent;
  expired: ExpiredEvent;
  shutdown: ShutdownEvent;
}

/** Every stream event, tagged by its SSE `event:` name. */
export type StreamEvent<R extends Row = Row> =
  | { event: "change"; data: ChangeEvent<R> }
  | { event: "live"; data: LiveEvent }
  | { event: "reset"; data: ResetEvent }
  | { event: "expired"; data: ExpiredEvent }
  | { event: "shutdown"; data: ShutdownEvent };

/** The gateway's stable `error.code` values (README, "The stream"). */
export type GatewayErrorCode =
  | "bad_request"
  | "unknown_position"
  | "unauthorized"
  | "invalid_token"
  | "token_expired"
  | "forbidden"
  | "tables_claim_missing"
  | "origin_not_allowed"
  | "not_found"
  | "method_not_allowed"
  | "request_timeout"
  | "uri_too_long"
  | "too_many_streams"
  | "rate_limited"
  | "headers_too_large"
  | "too_many_connections"
  | "unavailable"
  | "not_ready"
  | "schema_missing";

/**
 * Codes of errors that happen on the client's side of the wire: `network` (no answer, or
 * the connection broke), `bad_response` (an answer that is not what the API promises),
 * `token_provider` (your token provider threw), `load` (your `load` threw).
 */
export type ClientErrorCode = "network" | "bad_response" | "token_provider" | "load";

/** Every `PgfeedError.code`. */
export type ErrorCode = GatewayErrorCode | ClientErrorCode;

/** The body of every error answer: `{"error":{"code":"...","message":"..."}}`. */
export interface ErrorBody {
  error: { code: GatewayErrorCode; message: string };
}
