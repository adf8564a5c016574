/**
 * `@pgfeed/client`: a typed client for the pgfeed gateway.
 *
 * ```ts
 * import { connect } from "@pgfeed/client";
 * const feed = connect({ url: "https://feed.example.com", token: getToken, tables: "orders",
 *   onChange: (change) => console.log(change.op, change.pk) });
 * ```
 *
 * @module
 */

export { connect, getPosition } from "./client.js";
export type {
  EventSourceConstructor,
  EventSourceLike,
  Feed,
  FeedOptions,
  FeedStatus,
  GatewayOptions,
  TokenContext,
  TokenProvider,
  TokenReason,
  Transport,
} from "./options.js";
export { PgfeedError } from "./errors.js";
export { SseParser } from "./sse.js";
export type { SseMessage } from "./sse.js";
export type {
  ChangeEvent,
  ClientErrorCode,
  ControlEvents,
  DeleteChange,
  ErrorBody,
  ErrorCode,
  ExpiredEvent,
  GatewayErrorCode,
  InsertChange,
  LiveEvent,
  Op,
  Position,
  ResetEvent,
  Row,
  ShutdownEvent,
  StreamEvent,
  TruncateChange,
  UpdateChange,
} from "./types.js";
export { applyChange, keyOf } from "./rows.js";
