// The client against a real gateway (started by tests/js_client.rs): live changes, resume
// by position after a cut connection, tokens renewed on expiry and on a 401, fetch then
// subscribe, reset, typed errors, and the EventSource transport.
import assert from "node:assert/strict";
import { test } from "node:test";
import { EventSource } from "undici";
import { PgfeedError, connect, getPosition } from "@pgfeed/client";
import { env, insertNote, mintToken, needsGateway, newTenant, noteBodies, sql, startProxy, until } from "./helpers.mjs";

/** Opens a feed for `tenant` collecting what it sees; closed when the test ends. */
function open(t, tenant, extra = {}) {
  const seen = { changes: [], statuses: [], errors: [], resets: [], snapshots: [], tokens: [] };
  const feed = connect({
    url: env.url,
    tables: "notes",
    token: (context) => {
      seen.tokens.push(context);
      return mintToken(tenant);
    },
    onChange: (change) => seen.changes.push(change),
    onStatus: (status, error) => seen.statuses.push(error ? `${status}:${error.code}` : status),
    onError: (error) => seen.errors.push(error),
    onReset: (event) => seen.resets.push(event),
    onSnapshot: (snapshot) => seen.snapshots.push(snapshot),
    ...extra,
  });
  t.after(() => feed.close());
  return { feed, seen };
}

const bodies = (changes) => changes.map((c) => (c.op === "delete" ? `-${c.old.body}` : c.new.body));

test("inserts, updates and deletes arrive typed, in order, for the token's tenant only", needsGateway, async (t) => {
  const tenant = newTenant();
  const { feed, seen } = open(t, tenant);
  const live = await feed.ready;
  assert.equal(typeof live.position, "string");
  assert.equal(feed.status, "live");
  assert.equal(feed.transport, "fetch");
  assert.equal(seen.tokens[0].reason, "initial");

  const id = await insertNote(tenant, "one");
  await insertNote(newTenant(), "another tenant's");
  await sql(`UPDATE notes SET body = 'two' WHERE id = ${id}`);
  await sql(`DELETE FROM notes WHERE id = ${id}`);
  await until("three changes", () => seen.changes.length >= 3);
  const [ins, upd, del] = seen.changes;
  assert.equal(ins.op, "insert");
  assert.equal(ins.table, "public.notes");
  assert.equal(ins.tenant, tenant);
  assert.deepEqual(ins.pk, { id });
  assert.equal(ins.new.body, "one");
  assert.match(ins.committed_at, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$/);
  assert.equal(upd.op, "update");
  assert.deepEqual(upd.changed, ["body"]);
  assert.equal(upd.old.body, "one");
  assert.equal(upd.new.body, "two");
  assert.equal(del.op, "delete");
  assert.equal(del.old.body, "two");
  assert.equal(feed.position, del.position);
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(seen.changes.length, 3, "nothing of another tenant's");
  assert.deepEqual(seen.errors, []);
  assert.equal(seen.tokens.length, 1, "one token for one connection");
});

test("ops, filter and payload reach the stream; an AbortSignal closes the feed", needsGateway, async (t) => {
  const tenant = newTenant();
  const abort = new AbortController();
  const { feed, seen } = open(t, tenant, {
    ops: ["insert", "delete"],
    filter: "notes:body=neq.hidden",
    payload: "keys",
    signal: abort.signal,
  });
  await feed.ready;
  const id = await insertNote(tenant, "shown");
  await insertNote(tenant, "hidden");
  await sql(`UPDATE notes SET body = 'changed' WHERE id = ${id}`);
  await sql(`DELETE FROM notes WHERE id = ${id}`);
  await until("the insert and the delete", () => seen.changes.length >= 2);
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(
    seen.changes.map((c) => [c.op, c.pk, "new" in c || "old" in c]),
    [
      ["insert", { id }, false],
      ["delete", { id }, false],
    ],
  );
  abort.abort();
  assert.equal(feed.status, "closed");
  await assert.rejects(
    connect({ url: env.url, token: mintToken(tenant), signal: abort.signal }).ready,
    "an aborted signal closes a new feed at once",
  );
});

test("a cut connection resumes from the last position: nothing lost, nothing twice", needsGateway, async (t) => {
  const tenant = newTenant();
  const proxy = await startProxy();
  t.after(() => proxy.close());
  const { feed, seen } = open(t, tenant, { url: proxy.url });
  await feed.ready;
  await insertNote(tenant, "before");
  await until("the first change", () => seen.changes.length === 1);
  const last = feed.position;

  proxy.refuse(true);
  proxy.kill();
  for (const body of ["a", "b", "c"]) await insertNote(tenant, body);
  await until("the feed to notice", () => seen.statuses.some((s) => s.startsWith("reconnecting")));
  proxy.refuse(false);
  await until("the missed changes", () => seen.changes.length >= 4);
  await insertNote(tenant, "after");
  await until("the live change", () => seen.changes.length >= 5);
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(bodies(seen.changes), ["before", "a", "b", "c", "after"]);
  assert.equal(feed.status, "live");
  const resumed = proxy.heads.filter((h) => h.includes(`last-event-id: ${last}`) || h.includes(`Last-Event-ID: ${last}`));
  assert.ok(resumed.length >= 1, `a request resumed with Last-Event-ID ${last}: ${proxy.heads.join("\n---\n")}`);
  assert.ok(
    proxy.heads.every((h) => !h.includes("access_token")),
    "the fetch transport sends the token in a header, never in the URL",
  );
  assert.equal(seen.tokens.length, 1, "a plain reconnect reuses the token");
});

test("a token that expires mid-stream is renewed through the provider, without a gap", needsGateway, async (t) => {
  const tenant = newTenant();
  const seen = { changes: [], tokens: [] };
  const written = [];
  const feed = connect({
    url: env.url,
    tables: ["notes"],
    token: async (context) => {
      seen.tokens.push(context.reason);
      if (context.reason === "expired") {
        // Committed while the stream is down: only a resume from the position brings it.
        const body = `renewal${seen.tokens.length}`;
        await insertNote(tenant, body);
        written.push(body);
      }
      return mintToken(tenant, 1.5);
    },
    onChange: (change) => seen.changes.push(change),
  });
  t.after(() => feed.close());
  await feed.ready;
  for (let i = 0; i < 10; i += 1) {
    await insertNote(tenant, `n${i}`);
    written.push(`n${i}`);
    await new Promise((r) => setTimeout(r, 400));
  }
  await until("every change", () => seen.changes.length >= written.length);
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(seen.changes.length, written.length, "each once");
  assert.deepEqual(bodies(seen.changes).sort(), [...written].sort());
  assert.ok(seen.tokens.filter((r) => r === "expired").length >= 2, `renewed on expiry: ${seen.tokens}`);
});

test("a 401 token_expired asks the provider again, with the error", needsGateway, async (t) => {
  const tenant = newTenant();
  const contexts = [];
  const feed = connect({
    url: env.url,
    retry: { initial: 50 },
    token: (context) => {
      contexts.push(context);
      return mintToken(tenant, contexts.length === 1 ? -60 : 600);
    },
  });
  t.after(() => feed.close());
  await feed.ready;
  assert.equal(contexts.length, 2);
  assert.equal(contexts[1].reason, "expired");
  assert.ok(contexts[1].error instanceof PgfeedError);
  assert.equal(contexts[1].error.code, "token_expired");
  assert.equal(contexts[1].error.status, 401);
});

test("fetch, then subscribe: a change committed while loading is not missed", needsGateway, async (t) => {
  const tenant = newTenant();
  await insertNote(tenant, "old");
  const { feed, seen } = open(t, tenant, {
    load: async () => {
      const rows = await noteBodies(tenant);
      // Committed after the rows were read, before the stream opened.
      await insertNote(tenant, "meanwhile");
      return rows;
    },
  });
  await feed.ready;
  await until("the change made while loading", () => seen.changes.length >= 1);
  assert.deepEqual(seen.snapshots, [["old"]]);
  assert.deepEqual(bodies(seen.changes), ["meanwhile"]);

  const position = await getPosition({ url: env.url, token: mintToken(tenant) });
  assert.equal(typeof position, "string");
  await insertNote(tenant, "later");
  const from = [];
  const second = connect({ url: env.url, token: mintToken(tenant), from: position, onChange: (c) => from.push(c) });
  t.after(() => second.close());
  await until("the replayed change", () => from.length >= 1);
  assert.deepEqual(bodies(from), ["later"], "`from` replays after the position");
});

test("reset: a position pruned while away calls onReset and load again", needsGateway, async (t) => {
  const tenant = newTenant();
  const proxy = await startProxy();
  t.after(() => proxy.close());
  let loads = 0;
  const { feed, seen } = open(t, tenant, {
    url: proxy.url,
    load: async () => {
      loads += 1;
      return noteBodies(tenant);
    },
  });
  await feed.ready;
  await insertNote(tenant, "seen");
  await until("the first change", () => seen.changes.length === 1);

  proxy.refuse(true);
  proxy.kill();
  await insertNote(tenant, "while away");
  await sql("SELECT pgfeed.seal(); SELECT pgfeed.prune('0 seconds', 1000000)");
  proxy.refuse(false);
  await until("the reset", () => seen.resets.length === 1);
  await until("the reload", () => seen.snapshots.length === 2);
  assert.equal(loads, 2);
  assert.equal(typeof seen.resets[0].reason, "string");
  assert.equal(typeof seen.resets[0].position, "string");
  assert.deepEqual(seen.snapshots[1], ["seen", "while away"]);
  await insertNote(tenant, "after reset");
  await until("the change after the reset", () => seen.changes.some((c) => c.new?.body === "after reset"));
  assert.ok(!seen.changes.some((c) => c.new?.body === "while away"), "the pruned change comes through the reload");
});

test("a position from another database: onReset, load, then on from the head", needsGateway, async (t) => {
  const tenant = newTenant();
  let loads = 0;
  const { feed, seen } = open(t, tenant, {
    from: "999999999.1",
    load: async () => {
      loads += 1;
      return noteBodies(tenant);
    },
  });
  await feed.ready;
  assert.equal(seen.resets.length, 1);
  assert.equal(seen.resets[0].reason, "unknown_position");
  assert.equal(loads, 1, "`from` skips the first load; the reset loads");
  assert.ok(seen.errors.some((e) => e.code === "unknown_position" && e.status === 400));
  await insertNote(tenant, "after");
  await until("the change", () => seen.changes.length === 1);
  assert.deepEqual(bodies(seen.changes), ["after"]);
});

test("a request the gateway refuses as such stops the feed with a typed error", needsGateway, async (t) => {
  const { feed, seen } = open(t, newTenant(), { tables: "no_such_table" });
  await assert.rejects(feed.ready, (err) => err instanceof PgfeedError && err.status === 400 && err.fatal);
  assert.equal(feed.status, "closed");
  assert.equal(feed.error.code, "bad_request");
  assert.ok(seen.statuses.at(-1).startsWith("closed:"));

  const fixed = connect({ url: env.url, token: "not.a.jwt" });
  t.after(() => fixed.close());
  await assert.rejects(fixed.ready, (err) => err.code === "invalid_token");
  assert.equal(fixed.status, "closed", "a fixed token that is refused cannot get better");
});

test("the EventSource transport: token and position in the URL, resumed after a cut", needsGateway, async (t) => {
  const tenant = newTenant();
  const proxy = await startProxy();
  t.after(() => proxy.close());
  const { feed, seen } = open(t, tenant, { url: proxy.url, transport: "eventsource", EventSource });
  assert.equal(feed.transport, "eventsource");
  await feed.ready;
  await insertNote(tenant, "x");
  await until("the change", () => seen.changes.length === 1);
  proxy.refuse(true);
  proxy.kill();
  await insertNote(tenant, "y");
  await until("the feed to notice", () => seen.statuses.some((s) => s.startsWith("reconnecting")));
  proxy.refuse(false);
  await until("the missed change", () => seen.changes.length === 2);
  assert.deepEqual(bodies(seen.changes), ["x", "y"]);
  assert.ok(proxy.heads.some((h) => h.includes("access_token=")));
});
