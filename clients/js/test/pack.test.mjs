// The tarball `npm pack` made (PGFEED_PACKAGE_TARBALL, from tests/js_client.rs), installed
// into an empty project: it loads as ESM and as CommonJS, both entries, and its types
// check in a TypeScript consumer under NodeNext resolution, importing and requiring.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const tarball = process.env.PGFEED_PACKAGE_TARBALL;
const here = dirname(fileURLToPath(import.meta.url));
const modules = join(here, "..", "node_modules");

test("the packed tarball installs and loads as ESM and CJS, types included", { skip: tarball ? false : "PGFEED_PACKAGE_TARBALL unset" }, (t) => {
  const dir = mkdtempSync(join(tmpdir(), "pgfeed-pack-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const scope = join(dir, "node_modules", "@pgfeed");
  mkdirSync(scope, { recursive: true });
  execFileSync("tar", ["-xzf", tarball, "-C", scope]);
  execFileSync("mv", [join(scope, "package"), join(scope, "client")]);
  // The peers a React app has.
  for (const peer of ["react", "@types/react", "csstype"]) {
    mkdirSync(dirname(join(dir, "node_modules", peer)), { recursive: true });
    symlinkSync(join(modules, peer), join(dir, "node_modules", peer));
  }
  writeFileSync(join(dir, "package.json"), '{"name":"consumer","private":true,"type":"module"}\n');

  const node = (args) => execFileSync(process.execPath, args, { cwd: dir, encoding: "utf8" });
  const esm = node([
    "--input-type=module",
    "-e",
    'import { connect, PgfeedError } from "@pgfeed/client"; import { useFeed } from "@pgfeed/client/react";' +
      'console.log(typeof connect, typeof useFeed, new PgfeedError("network", "x").code)',
  ]);
  assert.equal(esm.trim(), "function function network");
  const cjs = node([
    "--input-type=commonjs",
    "-e",
    'const { connect } = require("@pgfeed/client"); const { useInvalidateOnChange } = require("@pgfeed/client/react");' +
      "console.log(typeof connect, typeof useInvalidateOnChange)",
  ]);
  assert.equal(cjs.trim(), "function function");

  writeFileSync(
    join(dir, "consumer.ts"),
    `import { connect, type ChangeEvent, type ErrorCode, PgfeedError } from "@pgfeed/client";
import { useFeed, type QueryClientLike } from "@pgfeed/client/react";
type Order = { id: number; status: string };
const feed = connect<Order>({
  url: "http://127.0.0.1:8080",
  token: async ({ reason }) => reason,
  tables: ["orders"],
  onChange: (change: ChangeEvent<Order>) => {
    if (change.op === "update") { const s: string | undefined = change.new?.status; const c: string[] = change.changed; void s; void c; }
    // @ts-expect-error a truncate has no row
    if (change.op === "truncate") void change.new;
  },
  onError: (e: PgfeedError) => { const code: ErrorCode = e.code; void code; },
});
feed.close();
const code: ErrorCode = "token_expired";
// @ts-expect-error not a code
const wrong: ErrorCode = "no_such_code";
void code; void wrong; void useFeed; const q: QueryClientLike | undefined = undefined; void q;
`,
  );
  writeFileSync(
    join(dir, "consumer.cts"),
    `import client = require("@pgfeed/client");
import react = require("@pgfeed/client/react");
const change: client.ChangeEvent | undefined = undefined;
void change; void react.useFeed; void client.connect;
`,
  );
  writeFileSync(
    join(dir, "tsconfig.json"),
    JSON.stringify({
      compilerOptions: { noEmit: true, strict: true, module: "nodenext", moduleResolution: "nodenext", lib: ["es2022", "dom"], types: [] },
      files: ["consumer.ts", "consumer.cts"],
    }),
  );
  const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");
  const out = (() => {
    try {
      return node([tsc, "-p", "tsconfig.json"]);
    } catch (e) {
      return `${e.stdout}${e.stderr}`;
    }
  })();
  assert.equal(out, "", "the consumer type-checks");
});
