// The React entry against a real gateway: useFeed renders the feed's status and changes and
// closes it on unmount; useInvalidateOnChange invalidates a real TanStack QueryClient's keys.
import assert from "node:assert/strict";
import { test } from "node:test";
import { QueryClient } from "@tanstack/react-query";
import { createElement } from "react";
import TestRenderer, { act } from "react-test-renderer";
import { tableKey, useFeed, useInvalidateOnChange } from "@pgfeed/client/react";
import { env, insertNote, mintToken, needsGateway, newTenant, until } from "./helpers.mjs";

// The renderer is driven like a page: updates come from the network, outside act(), which
// only mounts, updates and unmounts.
globalThis.IS_REACT_ACT_ENVIRONMENT = false;
async function inAct(fn) {
  globalThis.IS_REACT_ACT_ENVIRONMENT = true;
  try {
    await act(fn);
  } finally {
    globalThis.IS_REACT_ACT_ENVIRONMENT = false;
  }
}
// react-test-renderer 19 warns that it is deprecated unless told it runs React Native tests.
globalThis.IS_REACT_NATIVE_TEST_ENVIRONMENT = true;

test("useFeed renders status and changes, follows new options, and closes on unmount", needsGateway, async () => {
  const tenant = newTenant();
  const results = [];
  let tokenCalls = 0;
  function Notes({ tables }) {
    // New callbacks on every render must not reconnect.
    const result = useFeed({
      url: env.url,
      tables,
      token: () => {
        tokenCalls += 1;
        return mintToken(tenant);
      },
      onChange: () => {},
    });
    results.push(result);
    return createElement("p", null, `${result.status}:${result.lastChange?.new?.body ?? ""}`);
  }
  let renderer;
  await inAct(async () => {
    renderer = TestRenderer.create(createElement(Notes, { tables: "notes" }));
  });
  const text = () => renderer.toJSON().children.join("");
  await until("live", () => text() === "live:");
  await insertNote(tenant, "hello");
  await until("the change rendered", () => text() === "live:hello");
  const feed = results.at(-1).feed;
  assert.equal(feed.status, "live");
  assert.equal(results.at(-1).position, feed.position);
  assert.equal(tokenCalls, 1, "re-renders reuse the feed");

  await inAct(async () => renderer.update(createElement(Notes, { tables: "public.notes" })));
  await until("a new feed", () => results.at(-1).feed !== feed && results.at(-1).status === "live");
  assert.equal(feed.status, "closed", "the old feed closed when the options changed");
  const second = results.at(-1).feed;
  await inAct(async () => renderer.unmount());
  assert.equal(second.status, "closed", "unmounting closes the feed");
});

test("useInvalidateOnChange invalidates the change's table key, and every query at the first live", needsGateway, async () => {
  const tenant = newTenant();
  const queryClient = new QueryClient();
  const fetchNotes = () => queryClient.fetchQuery({ queryKey: ["notes", tenant], queryFn: () => "rows" });
  const fetchOther = () => queryClient.fetchQuery({ queryKey: ["other"], queryFn: () => "other" });
  await fetchNotes();
  await fetchOther();
  const invalid = (key) => queryClient.getQueryState(key)?.isInvalidated === true;
  let status = "";
  function App() {
    const feed = useInvalidateOnChange(queryClient, { url: env.url, token: () => mintToken(tenant), tables: "notes" });
    status = feed.status;
    return null;
  }
  let renderer;
  await inAct(async () => {
    renderer = TestRenderer.create(createElement(App));
  });
  await until("live", () => status === "live");
  await until("everything invalidated at the first live", () => invalid(["notes", tenant]) && invalid(["other"]));
  await fetchNotes();
  await fetchOther();
  assert.ok(!invalid(["notes", tenant]) && !invalid(["other"]));

  await insertNote(tenant, "x");
  await until("the notes key invalidated", () => invalid(["notes", tenant]));
  assert.ok(!invalid(["other"]), "only the change's table");
  await inAct(async () => renderer.unmount());
  queryClient.clear();
});

test("tableKey drops only the public schema", () => {
  const change = { op: "truncate", position: "1", committed_at: "", table: "public.orders" };
  assert.deepEqual(tableKey(change), [["orders"]]);
  assert.deepEqual(tableKey({ ...change, table: "shop.orders" }), [["shop.orders"]]);
});
