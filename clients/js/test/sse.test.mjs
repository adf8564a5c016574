// The SSE parser on its own: line endings, chunk boundaries, comments, ids, retry.
import assert from "node:assert/strict";
import { test } from "node:test";
import { SseParser } from "@pgfeed/client";

function parse(chunks) {
  const events = [];
  const retries = [];
  const parser = new SseParser((m) => events.push(m), (ms) => retries.push(ms));
  for (const chunk of chunks) parser.push(chunk);
  return { events, retries };
}

test("frames, comments, retry and ids as the gateway sends them", () => {
  const { events, retries } = parse([
    "retry: 2000\n\n: keepalive\n\nid: 7\nevent: change\ndata: {\"a\":1}\n\nevent: live\ndata: {}\n\n",
  ]);
  assert.deepEqual(retries, [2000]);
  assert.deepEqual(events, [
    { event: "change", data: '{"a":1}', id: "7" },
    { event: "live", data: "{}", id: "7" },
  ]);
});

test("any chunking and CR, LF or CRLF line ends give the same events", () => {
  const text = "id: 1\r\nevent: change\r\ndata: x\r\ndata: y\r\n\r\nid: 2\revent: e\rdata: z\r\rdata:no-space\n\n";
  const whole = parse([text]).events;
  assert.deepEqual(whole, [
    { event: "change", data: "x\ny", id: "1" },
    { event: "e", data: "z", id: "2" },
    { event: "message", data: "no-space", id: "2" },
  ]);
  for (let size = 1; size < 8; size += 1) {
    const chunks = [];
    for (let i = 0; i < text.length; i += size) chunks.push(text.slice(i, i + size));
    assert.deepEqual(parse(chunks).events, whole, `chunks of ${size}`);
  }
});

test("an event without data is not dispatched; an unfinished one waits", () => {
  const { events } = parse(["event: nothing\n\nevent: change\ndata: 1"]);
  assert.deepEqual(events, []);
});
