/**
 * What both the feed and `getPosition` do over HTTP: URLs, headers, the token provider,
 * `GET /v1/position`, and turning failures into `PgfeedError`s.
 *
 * @module
 */

import { PgfeedError, errorFromResponse } from "./errors.js";
import type { GatewayOptions, TokenContext } from "./options.js";
import type { Position } from "./types.js";

/** `url` without trailing slashes, with `path` appended. */
export function endpoint(url: string | URL, path: string): string {
  return `${String(url).replace(/\/+$/, "")}${path}`;
}

/** A comma list for a query parameter, or nothing when empty. */
export function list(value: string | readonly string[] | undefined): string | undefined {
  if (value === undefined) return undefined;
  const text = typeof value === "string" ? value : value.join(",");
  return text === "" ? undefined : text;
}

/** The `fetch` to use: the options' or the global one. */
export function fetchOf(options: GatewayOptions): typeof fetch {
  const f = options.fetch ?? globalThis.fetch;
  if (typeof f !== "function") {
    throw new PgfeedError("network", "no fetch: pass `fetch` in the options");
  }
  return options.fetch ? f : f.bind(globalThis);
}

/** The options' headers plus `Authorization: Bearer <token>` when there is a token. */
export function requestHeaders(options: GatewayOptions, token: string | null | undefined): Record<string, string> {
  const headers: Record<string, string> = { ...options.headers };
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

/** The token: the fixed one, or the provider's answer to `context`. */
export async function resolveToken(
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

/** `err` as a `PgfeedError` (a `network` one unless it already is one). */
export function asPgfeedError(err: unknown): PgfeedError {
  if (err instanceof PgfeedError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new PgfeedError("network", message || "the connection failed", { cause: err });
}

/** Runs a callback of the user's: what it throws is reported, never breaks the feed. */
export function guarded<A extends unknown[]>(fn: ((...args: A) => unknown) | undefined, ...args: A): void {
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
export async function fetchPosition(options: GatewayOptions, token: string | null | undefined): Promise<Position> {
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
