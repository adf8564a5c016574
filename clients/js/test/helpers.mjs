// What the tests share: the gateway and database the Rust harness (tests/js_client.rs)
// started, tokens minted with its secret, SQL through psql, a TCP proxy that can cut
// connections, and waiting.
import { execFile } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import net from "node:net";

/** The harness's environment; the integration tests skip without it. */
export const env = {
  url: process.env.PGFEED_URL,
  secret: process.env.PGFEED_SECRET,
  database: process.env.DATABASE_URL,
};

/** `test()` options: skipped unless the harness gave a gateway. */
export const needsGateway = {
  skip: env.url && env.secret && env.database ? false : "PGFEED_URL, PGFEED_SECRET, DATABASE_URL unset (run through tests/js_client.rs)",
};

const b64 = (value) => Buffer.from(value).toString("base64url");

/** An HS256 token for `tenant`, expiring `ttl` seconds from now (negative: already expired). */
export function mintToken(tenant, ttl = 600) {
  const head = b64(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64(JSON.stringify({ tenant_id: tenant, exp: Date.now() / 1000 + ttl }));
  const signature = createHmac("sha256", env.secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${signature}`;
}

/** A tenant of the test's own, so that tests never see each other's rows. */
export function newTenant() {
  return `t_${randomBytes(6).toString("hex")}`;
}

/** Runs `sql` with psql; resolves to its unaligned output. */
export function sql(text) {
  return new Promise((resolve, reject) => {
    execFile(
      "psql",
      [env.database, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", text],
      (err, stdout, stderr) => (err ? reject(new Error(`psql: ${stderr || err.message}`)) : resolve(stdout.trim())),
    );
  });
}

/** Inserts a note for `tenant` and returns its id. */
export async function insertNote(tenant, body) {
  const text = body.replaceAll("'", "''");
  return Number(await sql(`INSERT INTO notes (tenant, body) VALUES ('${tenant}', '${text}') RETURNING id`));
}

/** The bodies of `tenant`'s notes, by id. */
export async function noteBodies(tenant) {
  const out = await sql(`SELECT coalesce(string_agg(body, ',' ORDER BY id), '') FROM notes WHERE tenant = '${tenant}'`);
  return out === "" ? [] : out.split(",");
}

/** Waits until `check()` is truthy (returning it), for at most `ms`. */
export async function until(what, check, ms = 20000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/**
 * A TCP proxy in front of the gateway: `kill()` cuts every connection through it,
 * `refuse(true)` closes new ones at once; `heads` holds the first bytes of each request.
 */
export async function startProxy() {
  const target = new URL(env.url);
  const sockets = new Set();
  const heads = [];
  let refusing = false;
  const server = net.createServer((client) => {
    if (refusing) {
      client.destroy();
      return;
    }
    const upstream = net.connect(Number(target.port), target.hostname);
    sockets.add(client);
    sockets.add(upstream);
    let first = true;
    client.on("data", (chunk) => {
      if (first) heads.push(chunk.toString("latin1"));
      first = false;
      upstream.write(chunk);
    });
    upstream.on("data", (chunk) => client.write(chunk));
    const end = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on("close", end);
    upstream.on("close", end);
    client.on("error", end);
    upstream.on("error", end);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    heads,
    kill() {
      for (const s of sockets) s.destroy();
      sockets.clear();
    },
    refuse(on) {
      refusing = on;
    },
    async close() {
      this.kill();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}
