/**
 * Keeping rows in a `Map` from `payload: "full"` changes.
 *
 * @module
 */

import type { ChangeEvent, Row } from "./types.js";

/** The map key of a primary key object, such as `{"id": 42}` from `change.pk`. */
export function keyOf(pk: Row): string {
  return JSON.stringify(pk);
}

/**
 * Applies one change to `rows` (a Map from `keyOf(pk)` to the row) for changes of one
 * table: insert and update store `new`, delete removes the key, truncate empties the map.
 * Returns `rows`.
 */
export function applyChange<R extends Row>(rows: Map<string, R>, change: ChangeEvent<R>): Map<string, R> {
  switch (change.op) {
    case "insert":
      if (change.new) rows.set(keyOf(change.pk), change.new);
      break;
    case "update":
      if (change.old) {
        // The key itself may have changed: drop the row under its old key.
        const old = change.old;
        rows.delete(keyOf(Object.fromEntries(Object.keys(change.pk).map((k) => [k, old[k]]))));
      }
      if (change.new) rows.set(keyOf(change.pk), change.new);
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
