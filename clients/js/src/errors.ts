/**
 * `PgfeedError`: every failure the client reports, with the gateway's stable `error.code`
 * (or a client-side code) and whether retrying can help.
 *
 * @module
 */

import type { ErrorCode, GatewayErrorCode } from "./types.js";

/** Codes after which the same request will fail the same way: the feed stops. */
const FATAL: ReadonlySet<string> = new Set<GatewayErrorCode>([
  "bad_request",
  "forbidden",
  "tables_claim_missing",
  "origin_not_allowed",
  "not_found",
  "method_not_allowed",
  "uri_too_long",
  "headers_too_large",
]);

/** Codes that a fresh token may cure. */
const AUTH: ReadonlySet<string> = new Set<GatewayErrorCode>([
  "unauthorized",
  "invalid_token",
  "token_expired",
]);

/** An error from the gateway (its JSON error) or from the client's side of the wire. */
export class PgfeedError extends Error {
  /** The gateway's `error.code`, or `network`, `bad_response`, `token_provider`, `load`. */
  readonly code: ErrorCode;
  /** The HTTP status, when the gateway answered. */
  readonly status: number | undefined;
  /** Seconds from a `Retry-After` header (429, 503). */
  readonly retryAfter: number | undefined;

  constructor(
    code: ErrorCode,
    message: string,
    options: { status?: number; retryAfter?: number; cause?: unknown } = {},
  ) {
    super(message);
    this.name = "PgfeedError";
    this.code = code;
    this.status = options.status;
    this.retryAfter = options.retryAfter;
    if (options.cause !== undefined) {
      Object.defineProperty(this, "cause", { value: options.cause, enumerable: false });
    }
  }

  /** Whether the feed gives up on it (a request the gateway will refuse again as it is). */
  get fatal(): boolean {
    return FATAL.has(this.code);
  }

  /** Whether it is about the credentials (the token provider is asked again). */
  get auth(): boolean {
    return AUTH.has(this.code);
  }
}

/** The gateway's error from a non-2xx `response` (reading its JSON body). */
export async function errorFromResponse(response: Response): Promise<PgfeedError> {
  const retry = Number(response.headers.get("retry-after"));
  const options = {
    status: response.status,
    retryAfter: Number.isFinite(retry) && retry >= 0 ? retry : undefined,
  };
  let text = "";
  try {
    text = await response.text();
    const body = JSON.parse(text) as { error?: { code?: unknown; message?: unknown } };
    const code = body?.error?.code;
    const message = body?.error?.message;
    if (typeof code === "string") {
      return new PgfeedError(
        code as ErrorCode,
        typeof message === "string" ? message : code,
        options,
      );
    }
  } catch {
    // Not the gateway's JSON: a proxy in between, say.
  }
  return new PgfeedError(
    "bad_response",
    `HTTP ${response.status}${text ? `: ${text.slice(0, 200)}` : ""}`,
    options,
  );
}
