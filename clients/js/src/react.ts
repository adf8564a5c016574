/**
 * `@pgfeed/client/react`: `useFeed()`, a feed tied to a component's life, and
 * `useInvalidateOnChange()`, which invalidates TanStack Query keys as changes arrive.
 *
 * @module
 */

import { useEffect, useRef, useState } from "react";
import { connect } from "./client.js";
import type { Feed, FeedOptions, FeedStatus } from "./options.js";
import type { PgfeedError } from "./errors.js";
import type { ChangeEvent, Position, ResetEvent, Row } from "./types.js";

/** [[FeedOptions]] plus `enabled` (default true; false closes the feed). */
export interface UseFeedOptions<R extends Row = Row, S = unknown> extends FeedOptions<R, S> {
  enabled?: boolean;
}

/** What `useFeed` renders from. */
export interface UseFeedResult<R extends Row = Row> {
  status: FeedStatus;
  /** The newest position seen. */
  position: Position | undefined;
  /** The last change delivered. */
  lastChange: ChangeEvent<R> | undefined;
  /** The error that stopped the feed, or the last one it retried (cleared when live again). */
  error: PgfeedError | undefined;
  /** The running feed (null while disabled). */
  feed: Feed | null;
}

/** The options that decide the subscription: a change of one of them reconnects. */
function identity(o: UseFeedOptions<never, never>): string {
  return JSON.stringify([
    String(o.url),
    o.tables,
    o.ops,
    o.filter,
    o.payload,
    o.from,
    o.transport,
    o.credentials,
    o.headers,
    typeof o.token === "string" ? o.token : null,
    o.enabled ?? true,
  ]);
}

/**
 * Subscribes while the component is mounted (and `enabled`). Callbacks and the token
 * provider may be new functions on every render: the latest ones are called. A change of
 * `url`, `tables`, `ops`, `filter`, `payload`, `from`, `transport`, `credentials`,
 * `headers` or a string `token` opens a new feed. Re-renders on every change and status.
 */
export function useFeed<R extends Row = Row, S = unknown>(options: UseFeedOptions<R, S>): UseFeedResult<R> {
  const latest = useRef(options);
  latest.current = options;
  const key = identity(options as unknown as UseFeedOptions<never, never>);
  const [result, setResult] = useState<UseFeedResult<R>>({
    status: options.enabled === false ? "closed" : "connecting",
    position: options.from,
    lastChange: undefined,
    error: undefined,
    feed: null,
  });

  useEffect(() => {
    const o = latest.current;
    if (o.enabled === false) {
      setResult((r) => ({ ...r, status: "closed", feed: null }));
      return undefined;
    }
    const token = o.token;
    let feed: Feed | null = null;
    // A feed being replaced (new options, StrictMode's second mount) renders nothing more.
    let active = true;
    const update = (patch: Partial<UseFeedResult<R>>) => {
      if (!active) return;
      setResult((r) => ({ ...r, position: feed?.position ?? r.position, error: feed?.error, feed, ...patch }));
    };
    feed = connect<R, S>({
      ...o,
      token: typeof token === "function" ? (context) => (latest.current.token as typeof token)(context) : token,
      load: o.load ? () => (latest.current.load as () => S | Promise<S>)() : undefined,
      onSnapshot: (snapshot) => latest.current.onSnapshot?.(snapshot),
      onChange: (change) => {
        latest.current.onChange?.(change);
        update({ lastChange: change });
      },
      onReset: (event: ResetEvent) => latest.current.onReset?.(event),
      onLive: (event) => latest.current.onLive?.(event),
      onError: (error) => latest.current.onError?.(error),
      onStatus: (status, error) => {
        latest.current.onStatus?.(status, error);
        update({ status });
      },
    });
    update({ status: feed.status });
    return () => {
      active = false;
      feed?.close();
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [key]);

  return result;
}

/** A TanStack Query key. */
export type QueryKey = readonly unknown[];

/** The part of TanStack Query's `QueryClient` used here (v4 and v5 fit). */
export interface QueryClientLike {
  invalidateQueries(filters?: { queryKey?: QueryKey }): unknown;
}

/** The query keys a change makes stale. */
export type QueryKeysFor<R extends Row = Row> = (change: ChangeEvent<R>) => readonly QueryKey[] | undefined;

/** The default [[QueryKeysFor]]: `[table]`, without `public.` (`["orders"]` for `public.orders`). */
export function tableKey(change: ChangeEvent<Row>): QueryKey[] {
  const table = change.table.startsWith("public.") ? change.table.slice("public.".length) : change.table;
  return [[table]];
}

/** What to invalidate on what. */
export interface InvalidateOptions<R extends Row = Row> {
  /** The keys a change makes stale; default [[tableKey]]. Keys match by prefix, as in TanStack. */
  queryKeys?: QueryKeysFor<R>;
  /** Keys to invalidate after a `reset` (and at the first `live`); default every query. */
  staleKeys?: readonly QueryKey[];
}

/**
 * An invalidator for a feed, without React: `onChange` collects the keys of a burst of
 * changes and invalidates each once (on the next task); `invalidateStale()` invalidates
 * `staleKeys` (or every query).
 */
export function invalidator<R extends Row = Row>(
  queryClient: QueryClientLike,
  options: InvalidateOptions<R> = {},
): { onChange(change: ChangeEvent<R>): void; invalidateStale(): void } {
  const pending = new Map<string, QueryKey>();
  let scheduled = false;
  const flush = () => {
    scheduled = false;
    const keys = [...pending.values()];
    pending.clear();
    for (const queryKey of keys) void queryClient.invalidateQueries({ queryKey });
  };
  return {
    onChange(change) {
      const keys = (options.queryKeys ?? (tableKey as QueryKeysFor<R>))(change) ?? [];
      for (const key of keys) pending.set(JSON.stringify(key), key);
      if (!scheduled && pending.size > 0) {
        scheduled = true;
        setTimeout(flush, 0);
      }
    },
    invalidateStale() {
      if (options.staleKeys) {
        for (const queryKey of options.staleKeys) void queryClient.invalidateQueries({ queryKey });
      } else {
        void queryClient.invalidateQueries();
      }
    },
  };
}

/**
 * [[useFeed]] that invalidates TanStack Query keys: those of each change (coalesced per
 * burst), and `staleKeys` (default: every query) after a `reset` and at the first `live`
 * of a feed without `from`, which covers changes committed between your queries' first
 * fetch and the stream's start.
 *
 * ```tsx
 * const queryClient = useQueryClient();
 * useInvalidateOnChange(queryClient, { url, token: getToken, tables: "orders" });
 * ```
 */
export function useInvalidateOnChange<R extends Row = Row, S = unknown>(
  queryClient: QueryClientLike,
  options: UseFeedOptions<R, S> & InvalidateOptions<R>,
): UseFeedResult<R> {
  const latest = useRef(options);
  latest.current = options;
  const inv = useRef<ReturnType<typeof invalidator<R>> | null>(null);
  const client = useRef(queryClient);
  if (inv.current === null || client.current !== queryClient) {
    client.current = queryClient;
    inv.current = invalidator<R>(queryClient, {
      queryKeys: (change) => (latest.current.queryKeys ?? (tableKey as QueryKeysFor<R>))(change),
      get staleKeys() {
        return latest.current.staleKeys;
      },
    });
  }
  // The identity of the feed that last went live: a new feed (new tables, say) did not
  // resume, so its first `live` invalidates too.
  const wentLive = useRef<string | null>(null);
  return useFeed<R, S>({
    ...options,
    onChange: (change) => {
      latest.current.onChange?.(change);
      inv.current?.onChange(change);
    },
    onReset: async (event) => {
      await latest.current.onReset?.(event);
      inv.current?.invalidateStale();
    },
    onLive: (event) => {
      latest.current.onLive?.(event);
      const feed = identity(latest.current as unknown as UseFeedOptions<never, never>);
      if (wentLive.current !== feed && latest.current.from === undefined) inv.current?.invalidateStale();
      wentLive.current = feed;
    },
  });
}
