//! Schema changes after `watch`, made the way an application's migrations make them: by an
//! application role that is not a superuser and owns the database and its tables, while
//! the operator (a superuser) ran `pgfeed.watch`. Renamed, added and dropped columns,
//! `include_columns`, partitioned tables and inheritance, and `DROP TABLE` (issue 15,
//! items 3, 4 and 9). Each setting must follow its column, and whatever pgfeed cannot
//! follow must be refused, never silently published, misrouted or lost.

use pgfeed_testkit as support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Gateway, Run, SseClient, TestDb, op_table_v, query_i64, server_message};

/// A test database handed to an application role, with a connection as that role (which
/// runs the DDL and the writes) and one as the superuser operator (which runs `watch`).
struct Setup {
    db: TestDb,
    app: tokio_postgres::Client,
    admin: tokio_postgres::Client,
}

/// A database owned by a fresh application role that has run `app_sql` (its migration).
async fn setup(app_sql: &str) -> Setup {
    let db = TestDb::new().await;
    let (_role, app) = support::app_owner(&db, "app").await;
    app.run(app_sql).await;
    let admin = db.client().await;
    Setup { db, app, admin }
}

/// [`setup`], then the operator runs `watch_sql`.
async fn setup_watched(app_sql: &str, watch_sql: &str) -> Setup {
    let setup = setup(app_sql).await;
    setup.admin.run(watch_sql).await;
    setup
}

/// `users`, watched by `org` with its `password_hash` column excluded.
async fn users_hiding_password_hash() -> Setup {
    setup_watched(
        "CREATE TABLE users (id int PRIMARY KEY, org text NOT NULL, name text, password_hash text)",
        "SELECT pgfeed.watch('users', tenant_column => 'org', exclude_columns => '{password_hash}')",
    )
    .await
}

/// The operator watches `table` by its column `tenant`.
async fn watch_by_tenant(admin: &tokio_postgres::Client, table: &str) {
    admin
        .run(&format!(
            "SELECT pgfeed.watch('{table}', tenant_column => 'tenant')"
        ))
        .await;
}

/// Runs `sql` as `who` and returns the server's message for its failure; panics if it
/// succeeds.
async fn fails(who: &tokio_postgres::Client, sql: &str) -> String {
    match who.batch_execute(sql).await {
        Ok(()) => panic!("`{sql}` succeeded; it must be refused"),
        Err(e) => server_message(&e),
    }
}

/// Runs DDL that pgfeed must refuse and checks that the refusal is pgfeed's own, with a
/// message that starts with `pgfeed:`.
async fn refused(who: &tokio_postgres::Client, sql: &str) -> String {
    let msg = fails(who, sql).await;
    assert!(
        msg.starts_with("pgfeed:"),
        "`{sql}` must be refused by pgfeed with a message starting \"pgfeed:\", got: {msg}"
    );
    msg
}

/// The keys of a JSON object.
fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

/// `names` as a set, to compare with [`keys`].
fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The [`op_table_v`] of the next change of `s`.
async fn next_summary(s: &mut SseClient) -> String {
    op_table_v(&s.next_change().await)
}

/// Assertions on the next change of a stream.
trait AssertNext {
    /// Asserts that the [`op_table_v`] of the next change is `want`.
    async fn assert_next(&mut self, want: &str);
}

impl AssertNext for SseClient {
    async fn assert_next(&mut self, want: &str) {
        assert_eq!(next_summary(self).await, want);
    }
}

/// The [`op_table_v`] of each change of `s` up to the first whose `v` is `end`; each must be
/// of `tenant` when given.
async fn summaries_until_end(s: &mut SseClient, tenant: Option<&str>) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let e = s.next_change().await;
        if let Some(tenant) = tenant {
            assert_eq!(e["tenant"], tenant, "{e}");
        }
        got.push(op_table_v(&e));
        if got.last().unwrap().ends_with(" end") {
            return got;
        }
    }
}

/// The status code of a stream opened with `query` (the stream is closed again).
async fn stream_status(gw: &Gateway, tenant: &str, query: &str) -> u16 {
    gw.stream(tenant, query).await.status
}

/// Waits until a stream of `acme` with `query` is accepted, well before the gateway's
/// periodic catalog refresh (30 s): the DDL rings the doorbell.
async fn until_accepted(gw: &Gateway, query: &str) {
    support::eventually_within(
        &format!("`{query}` is accepted"),
        Duration::from_secs(5),
        || async { stream_status(gw, "acme", query).await == 200 },
    )
    .await;
}

/// The entry of `table` in `pgfeed status --json`, which must list it.
async fn status_of(db: &TestDb, table: &str) -> Value {
    support::status_entry(db, table)
        .await
        .unwrap_or_else(|| panic!("status lists {table}"))
}

/// Capture triggers (those that call a function of schema pgfeed) on `table`.
async fn pgfeed_triggers(admin: &tokio_postgres::Client, table: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_trigger AS t
             JOIN pg_proc AS p ON p.oid = t.tgfoid
             JOIN pg_namespace AS n ON n.oid = p.pronamespace
             WHERE t.tgrelid = $1::text::regclass AND n.nspname = 'pgfeed'",
            &[&table],
        )
        .await
        .unwrap()
        .get(0)
}

// ---------------------------------------------------------------------------------------
// Item 3: settings follow the column.

#[tokio::test]
async fn renaming_an_excluded_column_keeps_it_out_of_events_journal_and_filters() {
    let Setup { db, app, admin } = users_hiding_password_hash().await;
    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;
    let visible = set(&["id", "org", "name"]);

    app.run("ALTER TABLE users RENAME COLUMN password_hash TO pw_hash")
        .await;
    app.run("INSERT INTO users VALUES (1, 'acme', 'ann', 'HASH-1')")
        .await;
    let ins = acme.next_change().await;
    assert_eq!(ins["op"], "insert");
    assert_eq!(
        keys(&ins["new"]),
        visible,
        "renamed excluded column published: {ins}"
    );

    app.run("UPDATE users SET name = 'anne', pw_hash = 'HASH-2' WHERE id = 1")
        .await;
    let upd = acme.next_change().await;
    assert_eq!(upd["op"], "update");
    assert_eq!(keys(&upd["new"]), visible, "{upd}");
    assert_eq!(keys(&upd["old"]), visible, "{upd}");
    assert_eq!(upd["changed"], json!(["name"]), "{upd}");

    // An update of the hidden column alone changes nothing anyone sees: no event. The
    // next event is the insert after it.
    app.run("UPDATE users SET pw_hash = 'HASH-3' WHERE id = 1")
        .await;
    app.run("INSERT INTO users VALUES (2, 'acme', 'bob', 'HASH-4')")
        .await;
    let next = acme.next_change().await;
    assert_eq!(
        (&next["op"], &next["pk"]),
        (&json!("insert"), &json!({"id": 2})),
        "an update of only the excluded column made an event: {next}"
    );
    assert_eq!(keys(&next["new"]), visible, "{next}");

    // Renamed inside the transaction that writes, before and between its writes.
    app.run(
        "BEGIN;
         ALTER TABLE users RENAME COLUMN pw_hash TO secret_hash;
         INSERT INTO users VALUES (3, 'acme', 'cy', 'HASH-5');
         COMMIT",
    )
    .await;
    let e = acme.next_change().await;
    assert_eq!(e["pk"], json!({"id": 3}));
    assert_eq!(
        keys(&e["new"]),
        visible,
        "rename in the writing transaction: {e}"
    );
    app.run(
        "BEGIN;
         INSERT INTO users VALUES (4, 'acme', 'dee', 'HASH-6');
         ALTER TABLE users RENAME COLUMN secret_hash TO h;
         UPDATE users SET h = 'HASH-7', name = 'di' WHERE id = 4;
         COMMIT",
    )
    .await;
    let e = acme.next_change().await;
    assert_eq!((&e["op"], &e["pk"]), (&json!("insert"), &json!({"id": 4})));
    assert_eq!(keys(&e["new"]), visible, "{e}");
    let e = acme.next_change().await;
    assert_eq!((&e["op"], &e["pk"]), (&json!("update"), &json!({"id": 4})));
    assert_eq!(keys(&e["new"]), visible, "rename between writes: {e}");
    assert_eq!(keys(&e["old"]), visible, "rename between writes: {e}");
    assert_eq!(e["changed"], json!(["name"]), "{e}");

    assert!(
        !acme.raw.contains("HASH-"),
        "a hash reached a browser: {}",
        acme.raw
    );
    let journaled = query_i64(
        &admin,
        "SELECT count(*) FROM pgfeed.changes
             WHERE coalesce(new::text, '') || coalesce(old::text, '') LIKE '%HASH-%'",
        &[],
    )
    .await;
    assert_eq!(journaled, 0, "excluded values never leave the database");

    // `status` shows the truth: the column under its current name.
    let entry = status_of(&db, "public.users").await;
    assert_eq!(entry["exclude_columns"], json!(["h"]), "{entry}");
    assert_eq!(entry["tenant_column"], "org", "{entry}");

    // Nor can a filter probe it. Ring the catalog doorbell by hand and wait until a newly
    // added column is filterable, so the gateway's catalog is surely current.
    app.run("ALTER TABLE users ADD COLUMN nickname text").await;
    admin.run("NOTIFY pgfeed, 'watch'").await;
    support::eventually("the gateway's catalog knows `nickname`", || async {
        stream_status(&gw, "acme", "filter=users:nickname=eq.x").await == 200
    })
    .await;
    assert_eq!(
        stream_status(&gw, "acme", "filter=users:h=eq.x").await,
        400,
        "a filter on the renamed excluded column must be refused"
    );
    gw.stop().await;
}

#[tokio::test]
async fn renaming_the_tenant_column_keeps_each_change_with_its_tenant() {
    let Setup { db, app, .. } = setup_watched(
        "CREATE TABLE orders (id int PRIMARY KEY, org text NOT NULL, v text)",
        "SELECT pgfeed.watch('orders', tenant_column => 'org')",
    )
    .await;
    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;
    let mut globex = gw.live("globex").await;

    app.run("ALTER TABLE orders RENAME COLUMN org TO company")
        .await;
    let entry = status_of(&db, "public.orders").await;
    assert_eq!(entry["tenant_column"], "company", "{entry}");

    app.run(
        "INSERT INTO orders VALUES (1, 'acme', 'a1');
         INSERT INTO orders VALUES (2, 'globex', 'g1');
         INSERT INTO orders VALUES (3, 'acme', 'a2');",
    )
    .await;
    let a1 = acme.next_change().await;
    assert_eq!(a1["tenant"], "acme", "{a1}");
    assert_eq!(a1["new"]["company"], "acme", "{a1}");
    assert_eq!(op_table_v(&a1), "insert public.orders a1");
    assert_eq!(
        next_summary(&mut acme).await,
        "insert public.orders a2",
        "acme must not receive globex's row"
    );
    let g1 = globex.next_change().await;
    assert_eq!(g1["tenant"], "globex", "{g1}");
    assert_eq!(op_table_v(&g1), "insert public.orders g1");

    // A row moved to another tenant under the new name: acme sees it leave, globex
    // sees it arrive.
    app.run("UPDATE orders SET company = 'globex' WHERE id = 1")
        .await;
    let left = acme.next_change().await;
    assert_eq!(
        (&left["op"], &left["pk"]),
        (&json!("delete"), &json!({"id": 1}))
    );
    let arrived = globex.next_change().await;
    assert_eq!(
        (&arrived["op"], &arrived["pk"], &arrived["tenant"]),
        (&json!("insert"), &json!({"id": 1}), &json!("globex"))
    );

    // Renamed again inside the transaction that writes.
    app.run(
        "BEGIN;
         ALTER TABLE orders RENAME COLUMN company TO tenant_id;
         INSERT INTO orders VALUES (4, 'globex', 'g2');
         COMMIT;
         INSERT INTO orders VALUES (5, 'acme', 'a3');",
    )
    .await;
    let g2 = globex.next_change().await;
    assert_eq!(
        (g2["tenant"].as_str(), op_table_v(&g2).as_str()),
        (Some("globex"), "insert public.orders g2")
    );
    assert_eq!(
        next_summary(&mut acme).await,
        "insert public.orders a3",
        "acme must not receive globex's row"
    );
    let entry = status_of(&db, "public.orders").await;
    assert_eq!(entry["tenant_column"], "tenant_id", "{entry}");
    gw.stop().await;
}

#[tokio::test]
async fn include_columns_publish_only_the_key_the_tenant_and_the_listed_columns() {
    let Setup { db, app, admin } = setup_watched(
        "CREATE TABLE t (id int PRIMARY KEY, org text NOT NULL, title text, body text);
         CREATE TABLE t2 (id int PRIMARY KEY, org text NOT NULL, title text, body text);
         CREATE TABLE t3 (id int PRIMARY KEY, org text NOT NULL, title text, body text);",
        "SELECT pgfeed.watch('t', tenant_column => 'org', include_columns => '{title}')",
    )
    .await;
    let entry = status_of(&db, "public.t").await;
    assert_eq!(entry["include_columns"], json!(["title"]), "{entry}");

    // An allow-list and a deny-list together, or an allow-list naming a column the table
    // does not have: refused.
    let both = fails(
        &admin,
        "SELECT pgfeed.watch('t2', tenant_column => 'org', include_columns => '{title}', exclude_columns => '{body}')",
    )
    .await;
    assert!(
        both.contains("include") || both.contains("exclude"),
        "{both}"
    );
    let missing = fails(
        &admin,
        "SELECT pgfeed.watch('t2', tenant_column => 'org', include_columns => '{nope}')",
    )
    .await;
    assert!(missing.contains("nope"), "{missing}");

    // The CLI's --include-column does the same.
    let out = support::pgfeed_cli(
        &db,
        &[
            "watch",
            "t3",
            "--tenant-column",
            "org",
            "--include-column",
            "title",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;
    let published = set(&["id", "org", "title"]);
    app.run(
        "INSERT INTO t VALUES (1, 'acme', 'T1', 'BODY-1');
         INSERT INTO t3 VALUES (1, 'acme', 'T1', 'BODY-2');",
    )
    .await;
    let e = acme.next_change().await;
    assert_eq!(e["table"], "public.t");
    assert_eq!(keys(&e["new"]), published, "{e}");
    let e = acme.next_change().await;
    assert_eq!(e["table"], "public.t3");
    assert_eq!(keys(&e["new"]), published, "--include-column: {e}");

    // A column added later is not published, and changes to unlisted columns alone make
    // no event.
    app.run("ALTER TABLE t ADD COLUMN secret text").await;
    app.run(
        "INSERT INTO t VALUES (2, 'acme', 'T2', 'BODY-3', 'SECRET-1');
         UPDATE t SET secret = 'SECRET-2', body = 'BODY-4' WHERE id = 2;
         UPDATE t SET title = 'T2b' WHERE id = 2;",
    )
    .await;
    let e = acme.next_change().await;
    assert_eq!((&e["op"], &e["pk"]), (&json!("insert"), &json!({"id": 2})));
    assert_eq!(
        keys(&e["new"]),
        published,
        "a column added later was published: {e}"
    );
    let e = acme.next_change().await;
    assert_eq!(
        (&e["op"], &e["changed"]),
        (&json!("update"), &json!(["title"])),
        "an update of unlisted columns only made an event, or the title update is wrong: {e}"
    );
    assert_eq!(keys(&e["new"]), published, "{e}");
    assert_eq!(keys(&e["old"]), published, "{e}");

    // The listed column keeps its place in the list under a new name.
    app.run("ALTER TABLE t RENAME COLUMN title TO headline")
        .await;
    app.run("INSERT INTO t VALUES (3, 'acme', 'T3', 'BODY-5', 'SECRET-3')")
        .await;
    let e = acme.next_change().await;
    assert_eq!(keys(&e["new"]), set(&["id", "org", "headline"]), "{e}");
    assert_eq!(e["new"]["headline"], "T3");
    let entry = status_of(&db, "public.t").await;
    assert_eq!(entry["include_columns"], json!(["headline"]), "{entry}");

    assert!(
        !acme.raw.contains("SECRET-") && !acme.raw.contains("BODY-"),
        "an unlisted column reached a browser: {}",
        acme.raw
    );
    // Filters may name only what events carry.
    assert_eq!(stream_status(&gw, "acme", "filter=t:body=eq.x").await, 400);
    assert_eq!(stream_status(&gw, "acme", "filter=t3:body=eq.x").await, 400);
    assert_eq!(
        stream_status(&gw, "acme", "filter=t3:title=eq.x").await,
        200
    );
    gw.stop().await;
}

#[tokio::test]
async fn dropping_the_tenant_column_or_the_key_is_refused_and_an_excluded_column_may_go() {
    let Setup { db, app, .. } = setup_watched(
        "CREATE TABLE users (id int PRIMARY KEY, org text NOT NULL, name text, password_hash text, ssn text)",
        "SELECT pgfeed.watch('users', tenant_column => 'org', exclude_columns => '{password_hash,ssn}')",
    )
    .await;

    refused(&app, "ALTER TABLE users DROP COLUMN org").await;
    refused(&app, "ALTER TABLE users DROP COLUMN org CASCADE").await;
    refused(&app, "ALTER TABLE users DROP CONSTRAINT users_pkey").await;
    // Dropping a key column drops the primary key with it.
    refused(&app, "ALTER TABLE users DROP COLUMN id").await;
    let columns = query_i64(
        &app,
        "SELECT count(*) FROM pg_attribute
             WHERE attrelid = 'users'::regclass AND attname IN ('id', 'org') AND NOT attisdropped",
        &[],
    )
    .await;
    assert_eq!(columns, 2, "the refused statements changed nothing");

    app.run("ALTER TABLE users DROP COLUMN password_hash").await;
    // The dropped column's name stays excluded.
    let entry = status_of(&db, "public.users").await;
    assert_eq!(entry["exclude_columns"], json!(["ssn"]), "{entry}");
    assert_eq!(
        entry["exclude_dropped"],
        json!(["password_hash"]),
        "{entry}"
    );
    assert_eq!(entry["tenant_column"], "org", "{entry}");

    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;
    app.run("INSERT INTO users VALUES (1, 'acme', 'ann', 'SSN-1')")
        .await;
    let e = acme.next_change().await;
    assert_eq!(e["tenant"], "acme");
    assert_eq!(keys(&e["new"]), set(&["id", "org", "name"]), "{e}");
    gw.stop().await;
}

/// A migration that drops an excluded column and adds it back (to change its type, say)
/// makes another column with another attribute number: it must stay out all the same,
/// whichever way the migration is spelled, as must a column later renamed to that name.
#[tokio::test]
async fn an_excluded_column_dropped_and_added_again_stays_out() {
    let Setup { db, app, admin } = setup_watched(
        "CREATE TABLE users (id int PRIMARY KEY, org text NOT NULL, name text,
                             password_hash text, ssn text, note text)",
        "SELECT pgfeed.watch('users', tenant_column => 'org',
                             exclude_columns => '{password_hash,ssn}')",
    )
    .await;
    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;

    // Two statements, two transactions.
    app.run("ALTER TABLE users DROP COLUMN password_hash").await;
    app.run("ALTER TABLE users ADD COLUMN password_hash bytea")
        .await;
    // One statement.
    app.run("ALTER TABLE users DROP COLUMN ssn, ADD COLUMN ssn text")
        .await;
    let visible = set(&["id", "org", "name", "note"]);
    app.run("INSERT INTO users VALUES (1, 'acme', 'ann', 'NOTE-1', 'HASH-1', 'SSN-1')")
        .await;
    let e = acme.next_change().await;
    assert_eq!(keys(&e["new"]), visible, "a re-added excluded column: {e}");

    // Dropped, then another column renamed to its name: kept out too (when in doubt, a
    // column under an excluded name is not published).
    app.run("ALTER TABLE users DROP COLUMN ssn").await;
    app.run("ALTER TABLE users RENAME COLUMN note TO ssn").await;
    app.run("UPDATE users SET name = 'anne', ssn = 'SSN-2' WHERE id = 1")
        .await;
    let e = acme.next_change().await;
    assert_eq!(e["op"], "update", "{e}");
    assert_eq!(keys(&e["new"]), set(&["id", "org", "name"]), "{e}");
    assert_eq!(keys(&e["old"]), set(&["id", "org", "name"]), "{e}");

    assert!(
        !acme.raw.contains("HASH-") && !acme.raw.contains("SSN-"),
        "an excluded value reached a browser: {}",
        acme.raw
    );
    let journaled = query_i64(
        &admin,
        "SELECT count(*) FROM pgfeed.changes
             WHERE coalesce(new::text, '') || coalesce(old::text, '') ~ 'HASH-|SSN-'",
        &[],
    )
    .await;
    assert_eq!(journaled, 0, "excluded values never leave the database");
    let entry = status_of(&db, "public.users").await;
    // The live ones in column order: `ssn` is the renamed `note`, older than the re-added
    // `password_hash`.
    assert_eq!(
        entry["exclude_columns"],
        json!(["ssn", "password_hash"]),
        "{entry}"
    );
    assert_eq!(entry["exclude_dropped"], json!([]), "{entry}");
    // Once the gateway's catalog is surely current (a column added last is filterable),
    // filters cannot probe the re-added columns either.
    app.run("ALTER TABLE users ADD COLUMN nickname text").await;
    until_accepted(&gw, "filter=users:nickname=eq.x").await;
    for column in ["password_hash", "ssn"] {
        let query = format!("filter=users:{column}=eq.x");
        assert_eq!(stream_status(&gw, "acme", &query).await, 400, "{query}");
    }

    // Watching again states the settings afresh: what is not listed is published.
    admin
        .run("SELECT pgfeed.watch('users', tenant_column => 'org', exclude_columns => '{password_hash}')")
        .await;
    app.run("UPDATE users SET ssn = 'public now' WHERE id = 1")
        .await;
    let e = acme.next_change().await;
    assert_eq!(e["new"]["ssn"], "public now", "{e}");
    assert!(e["new"].get("password_hash").is_none(), "{e}");
    assert!(e["new"].get("nickname").is_some(), "{e}");
    gw.stop().await;
}

/// A drop the event triggers did not see (`session_replication_role = replica`, as restore
/// and replication tools run) is made up for by the next DDL they see: a column added under
/// the dropped excluded column's name is kept out.
#[tokio::test]
async fn an_excluded_column_dropped_unseen_stays_out_when_added_again() {
    let Setup { db, app, admin } = setup_watched(
        "CREATE TABLE users (id int PRIMARY KEY, org text NOT NULL, name text, ssn text)",
        "SELECT pgfeed.watch('users', tenant_column => 'org', exclude_columns => '{ssn}')",
    )
    .await;
    admin
        .run(
            "SET session_replication_role = replica;
             ALTER TABLE users DROP COLUMN ssn;
             RESET session_replication_role;",
        )
        .await;
    app.run(
        "ALTER TABLE users ADD COLUMN ssn text;
         INSERT INTO users VALUES (1, 'acme', 'ann', 'SSN-1');",
    )
    .await;
    let journaled = query_i64(
        &admin,
        "SELECT count(*) FROM pgfeed.changes WHERE new::text LIKE '%SSN-%'",
        &[],
    )
    .await;
    let captured = query_i64(&admin, "SELECT count(*) FROM pgfeed.changes", &[]).await;
    assert_eq!(
        (captured, journaled),
        (1, 0),
        "the re-added column was journaled"
    );
    let entry = status_of(&db, "public.users").await;
    assert_eq!(entry["exclude_columns"], json!(["ssn"]), "{entry}");
}

/// The key or the tenant column renamed to the name of a dropped excluded column is still
/// the key or the tenant column: the DDL works, and the name stays remembered for a column
/// that takes it once the key has moved on.
#[tokio::test]
async fn the_key_or_tenant_renamed_to_a_dropped_excluded_name_stays_published() {
    let Setup { db, app, .. } = setup_watched(
        "CREATE TABLE users (id int PRIMARY KEY, org text NOT NULL, name text, ssn text, dept text)",
        "SELECT pgfeed.watch('users', tenant_column => 'org', exclude_columns => '{ssn,dept}')",
    )
    .await;
    app.run(
        "ALTER TABLE users DROP COLUMN ssn, DROP COLUMN dept;
         ALTER TABLE users RENAME COLUMN id TO ssn;
         ALTER TABLE users RENAME COLUMN org TO dept;",
    )
    .await;
    let entry = status_of(&db, "public.users").await;
    assert_eq!(entry["exclude_dropped"], json!(["dept", "ssn"]), "{entry}");
    assert_eq!(entry["tenant_column"], "dept", "{entry}");

    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;
    app.run("INSERT INTO users VALUES (1, 'acme', 'ann')").await;
    let e = acme.next_change().await;
    assert_eq!(e["pk"], json!({"ssn": 1}), "{e}");
    assert_eq!(keys(&e["new"]), set(&["ssn", "dept", "name"]), "{e}");

    // The key moves on; a column added under the name it left is kept out.
    app.run(
        "ALTER TABLE users RENAME COLUMN ssn TO id;
         ALTER TABLE users ADD COLUMN ssn text;
         INSERT INTO users VALUES (2, 'acme', 'bob', 'SSN-2');",
    )
    .await;
    let e = acme.next_change().await;
    assert_eq!(e["pk"], json!({"id": 2}), "{e}");
    assert_eq!(keys(&e["new"]), set(&["id", "dept", "name"]), "{e}");
    gw.stop().await;
}

#[tokio::test]
async fn a_column_added_to_a_watched_table_is_filterable_at_once() {
    let Setup { db, app, .. } = setup_watched(
        "CREATE TABLE notes (id int PRIMARY KEY, tenant text NOT NULL, body text)",
        "SELECT pgfeed.watch('notes', tenant_column => 'tenant')",
    )
    .await;
    let gw = Gateway::start(&db).await;
    let query = "filter=notes:priority=eq.high";
    assert_eq!(stream_status(&gw, "acme", query).await, 400);

    app.run("ALTER TABLE notes ADD COLUMN priority text").await;
    until_accepted(&gw, query).await;
    let mut high = gw.stream("acme", query).await;
    assert_eq!(high.status, 200);
    assert!(high.until_live().await.is_empty());
    app.run(
        "INSERT INTO notes VALUES (1, 'acme', 'x', 'low');
         INSERT INTO notes VALUES (2, 'acme', 'y', 'high');",
    )
    .await;
    let e = high.next_change().await;
    assert_eq!(e["pk"], json!({"id": 2}), "{e}");
    assert_eq!(e["new"]["priority"], "high");
    gw.stop().await;
}

#[tokio::test]
async fn swapped_column_names_keep_each_setting_with_its_column() {
    let Setup { db, app, .. } = users_hiding_password_hash().await;
    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;

    // The hashes' column is now called `name`, and the names' column `password_hash`.
    app.run(
        "BEGIN;
         ALTER TABLE users RENAME COLUMN password_hash TO tmp;
         ALTER TABLE users RENAME COLUMN name TO password_hash;
         ALTER TABLE users RENAME COLUMN tmp TO name;
         COMMIT;
         INSERT INTO users (id, org, password_hash, name) VALUES (1, 'acme', 'ann', 'HASH-1');",
    )
    .await;
    let e = acme.next_change().await;
    assert_eq!(keys(&e["new"]), set(&["id", "org", "password_hash"]), "{e}");
    assert_eq!(e["new"]["password_hash"], "ann", "{e}");

    // And the tenants' column is now called `password_hash`.
    app.run(
        "BEGIN;
         ALTER TABLE users RENAME COLUMN org TO tmp;
         ALTER TABLE users RENAME COLUMN password_hash TO org;
         ALTER TABLE users RENAME COLUMN tmp TO password_hash;
         COMMIT;
         INSERT INTO users (id, password_hash, org, name) VALUES (2, 'acme', 'bob', 'HASH-2');",
    )
    .await;
    let e = acme.next_change().await;
    assert_eq!(e["tenant"], "acme", "{e}");
    assert_eq!(keys(&e["new"]), set(&["id", "org", "password_hash"]), "{e}");
    assert_eq!(e["new"]["org"], "bob", "{e}");
    assert!(!acme.raw.contains("HASH-"), "{}", acme.raw);
    let entry = status_of(&db, "public.users").await;
    assert_eq!(entry["tenant_column"], "password_hash", "{entry}");
    assert_eq!(entry["exclude_columns"], json!(["name"]), "{entry}");
    gw.stop().await;
}

#[tokio::test]
async fn renames_spelled_as_alter_view_or_foreign_table_are_followed_too() {
    // PostgreSQL renames a table's column through ALTER VIEW, ALTER MATERIALIZED VIEW and
    // ALTER FOREIGN TABLE as well, and those statements have tags of their own.
    let Setup { db, app, .. } = users_hiding_password_hash().await;
    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;
    let visible = set(&["id", "org", "name"]);
    let renames = [
        ("ALTER VIEW users RENAME COLUMN password_hash TO pw1", 1),
        ("ALTER MATERIALIZED VIEW users RENAME COLUMN pw1 TO pw2", 2),
        ("ALTER FOREIGN TABLE users RENAME COLUMN pw2 TO pw3", 3),
    ];
    for (rename, id) in renames {
        app.run(rename).await;
        let pw = rename.rsplit(' ').next().unwrap();
        app.run(&format!(
            "INSERT INTO users (id, org, name, {pw}) VALUES ({id}, 'acme', 'n', 'HASH-{id}')"
        ))
        .await;
        let e = acme.next_change().await;
        assert_eq!(keys(&e["new"]), visible, "after `{rename}`: {e}");
    }
    app.run("ALTER VIEW users RENAME COLUMN org TO company")
        .await;
    app.run("INSERT INTO users (id, company, name) VALUES (4, 'acme', 'routed')")
        .await;
    let e = acme.next_change().await;
    assert_eq!(
        (&e["tenant"], &e["new"]["name"]),
        (&json!("acme"), &json!("routed")),
        "{e}"
    );
    let entry = status_of(&db, "public.users").await;
    assert_eq!(entry["exclude_columns"], json!(["pw3"]), "{entry}");
    assert_eq!(entry["tenant_column"], "company", "{entry}");
    gw.stop().await;
}

#[tokio::test]
async fn dropping_what_the_tenant_or_key_column_depends_on_is_refused() {
    // DROP DOMAIN, DROP TYPE or DROP FUNCTION ... CASCADE drops the columns that depend on
    // what it drops: no ALTER TABLE in sight.
    let Setup { db, app, .. } = setup_watched(
        "CREATE DOMAIN tenant_name AS text;
         CREATE DOMAIN order_number AS int;
         CREATE TYPE mood AS ENUM ('calm', 'angry');
         CREATE TABLE orders (id order_number PRIMARY KEY, org tenant_name NOT NULL, v text, m mood);
         CREATE FUNCTION tenant_of(path text) RETURNS text LANGUAGE sql IMMUTABLE
             AS $$ SELECT split_part(path, '/', 1) $$;
         CREATE TABLE files (id int PRIMARY KEY, path text NOT NULL,
                             org text GENERATED ALWAYS AS (tenant_of(path)) STORED);",
        "SELECT pgfeed.watch('orders', tenant_column => 'org', exclude_columns => '{m}');
             SELECT pgfeed.watch('files', tenant_column => 'org');",
    )
    .await;
    refused(&app, "DROP DOMAIN tenant_name CASCADE").await;
    refused(&app, "DROP DOMAIN order_number CASCADE").await;
    refused(&app, "DROP FUNCTION tenant_of(text) CASCADE").await;
    // An excluded column may go this way too; its name stays excluded.
    app.run("DROP TYPE mood CASCADE").await;
    let entry = status_of(&db, "public.orders").await;
    assert_eq!(entry["tenant_column"], "org", "{entry}");
    assert_eq!(entry["exclude_columns"], json!([]), "{entry}");
    assert_eq!(entry["exclude_dropped"], json!(["m"]), "{entry}");

    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;
    app.run(
        "INSERT INTO orders VALUES (1, 'acme', 'routed');
         INSERT INTO files VALUES (1, 'acme/report.pdf');",
    )
    .await;
    let e = acme.next_change().await;
    assert_eq!(
        (&e["table"], &e["tenant"], &e["pk"]),
        (&json!("public.orders"), &json!("acme"), &json!({"id": 1})),
        "{e}"
    );
    let e = acme.next_change().await;
    assert_eq!(
        (&e["table"], &e["tenant"], &e["new"]["org"]),
        (&json!("public.files"), &json!("acme"), &json!("acme")),
        "{e}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_renamed_table_or_schema_renames_the_events() {
    let Setup { db, app, admin } = setup(&format!(
        "{MEASUREMENTS}
         CREATE SCHEMA crm;
         CREATE TABLE crm.orders (id int PRIMARY KEY, tenant text NOT NULL, v text);"
    ))
    .await;
    watch_by_tenant(&admin, "measurements").await;
    watch_by_tenant(&admin, "crm.orders").await;
    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;

    // Each rename, then a write under the new name: the event carries that name.
    let steps = [
        (
            "ALTER TABLE measurements RENAME TO readings",
            "readings",
            "public.readings",
        ),
        // ALTER INDEX renames tables too, under a tag of its own.
        (
            "ALTER INDEX readings RENAME TO samples",
            "samples",
            "public.samples",
        ),
        (
            "ALTER SCHEMA crm RENAME TO sales",
            "sales.orders",
            "sales.orders",
        ),
        (
            "ALTER TABLE sales.orders SET SCHEMA public",
            "orders",
            "public.orders",
        ),
    ];
    for (i, (ddl, table, event_name)) in steps.into_iter().enumerate() {
        app.run(ddl).await;
        app.run(&format!(
            "INSERT INTO {table} VALUES ({i}, 'acme', 'after')"
        ))
        .await;
        let e = acme.next_change().await;
        assert_eq!(e["table"], event_name, "after `{ddl}`: {e}");
    }
    let status = support::status_json(&db).await;
    let mut listed = support::status_tables(&status);
    listed.sort();
    assert_eq!(listed, ["public.orders", "public.samples"], "{status}");

    // Streams may name the tables by their new names at once, and receive their changes.
    until_accepted(&gw, "tables=samples,orders").await;
    let mut named = gw.stream("acme", "tables=samples,orders").await;
    assert!(named.until_live().await.is_empty());
    app.run(
        "INSERT INTO samples VALUES (10, 'acme', 'named');
         INSERT INTO orders VALUES (10, 'acme', 'named');",
    )
    .await;
    named.assert_next("insert public.samples named").await;
    named.assert_next("insert public.orders named").await;
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Item 4: partitions and inheritance.

/// `measurements`, partitioned by tenant, with partitions for `acme` and `globex`.
const MEASUREMENTS: &str = "
    CREATE TABLE measurements (id int, tenant text NOT NULL, v text, PRIMARY KEY (tenant, id))
        PARTITION BY LIST (tenant);
    CREATE TABLE measurements_acme PARTITION OF measurements FOR VALUES IN ('acme');
    CREATE TABLE measurements_globex PARTITION OF measurements FOR VALUES IN ('globex');";

/// [`MEASUREMENTS`], watched.
async fn measurements_watched() -> Setup {
    let setup = setup(MEASUREMENTS).await;
    watch_by_tenant(&setup.admin, "measurements").await;
    setup
}

#[tokio::test]
async fn a_partitioned_parent_captures_every_partition_under_its_own_name() {
    let Setup { db, app, .. } = measurements_watched().await;
    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;
    let mut globex = gw.live("globex").await;

    for sql in [
        // One statement through the parent, routed to both partitions.
        "INSERT INTO measurements VALUES (1, 'acme', 'a1'), (2, 'globex', 'g1')",
        // Straight into a partition.
        "INSERT INTO measurements_acme VALUES (3, 'acme', 'a2')",
        "UPDATE measurements SET v = 'a1b' WHERE id = 1",
        "UPDATE measurements_globex SET v = 'g1b' WHERE id = 2",
        "DELETE FROM measurements_acme WHERE id = 3",
        "DELETE FROM measurements WHERE id = 2",
        // Marks the end: each change above came exactly once if these come next.
        "INSERT INTO measurements VALUES (9, 'acme', 'end'), (9, 'globex', 'end')",
    ] {
        app.run(sql).await;
    }

    assert_eq!(
        summaries_until_end(&mut acme, Some("acme")).await,
        [
            "insert public.measurements a1",
            "insert public.measurements a2",
            "update public.measurements a1b",
            "delete public.measurements a2",
            "insert public.measurements end",
        ]
    );
    assert_eq!(
        summaries_until_end(&mut globex, Some("globex")).await,
        [
            "insert public.measurements g1",
            "update public.measurements g1b",
            "delete public.measurements g1b",
            "insert public.measurements end",
        ]
    );
    let entry = status_of(&db, "public.measurements").await;
    assert_eq!(entry["tenant_column"], "tenant");
    gw.stop().await;
}

#[tokio::test]
async fn a_row_moving_between_partitions_leaves_one_tenant_and_reaches_the_other() {
    let Setup { db, app, .. } = measurements_watched().await;
    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;
    let mut globex = gw.live("globex").await;
    app.run("INSERT INTO measurements VALUES (1, 'acme', 'a1')")
        .await;
    acme.assert_next("insert public.measurements a1").await;

    // PostgreSQL moves the row from measurements_acme to measurements_globex.
    app.run("UPDATE measurements SET tenant = 'globex', v = 'moved' WHERE id = 1")
        .await;
    app.run("INSERT INTO measurements VALUES (9, 'acme', 'end'), (9, 'globex', 'end')")
        .await;
    let gone = acme.next_change().await;
    assert_eq!(op_table_v(&gone), "delete public.measurements a1", "{gone}");
    acme.assert_next("insert public.measurements end").await;
    let came = globex.next_change().await;
    assert_eq!(
        op_table_v(&came),
        "insert public.measurements moved",
        "{came}"
    );
    assert_eq!(came["tenant"], "globex");
    globex.assert_next("insert public.measurements end").await;
    gw.stop().await;
}

#[tokio::test]
async fn partitions_created_or_attached_after_watch_are_captured() {
    let Setup { db, app, admin } = setup(
        "CREATE TABLE measurements (id int, tenant text NOT NULL, v text, PRIMARY KEY (tenant, id))
             PARTITION BY LIST (tenant);
         CREATE TABLE measurements_acme PARTITION OF measurements FOR VALUES IN ('acme');",
    )
    .await;
    watch_by_tenant(&admin, "measurements").await;
    let gw = Gateway::start(&db).await;
    let mut globex = gw.live("globex").await;
    let mut initech = gw.live("initech").await;

    app.run("CREATE TABLE measurements_globex PARTITION OF measurements FOR VALUES IN ('globex')")
        .await;
    app.run("INSERT INTO measurements VALUES (1, 'globex', 'through the parent')")
        .await;
    app.run("INSERT INTO measurements_globex VALUES (2, 'globex', 'direct')")
        .await;
    globex
        .assert_next("insert public.measurements through the parent")
        .await;
    globex
        .assert_next("insert public.measurements direct")
        .await;

    // A table of its own, with a row from before, attached later.
    app.run(
        "CREATE TABLE measurements_initech (id int NOT NULL, tenant text NOT NULL, v text);
         INSERT INTO measurements_initech VALUES (1, 'initech', 'before');
         ALTER TABLE measurements ATTACH PARTITION measurements_initech FOR VALUES IN ('initech');",
    )
    .await;
    app.run("INSERT INTO measurements VALUES (2, 'initech', 'through the parent')")
        .await;
    app.run("INSERT INTO measurements_initech VALUES (3, 'initech', 'direct')")
        .await;
    app.run("UPDATE measurements_initech SET v = 'updated' WHERE id = 1")
        .await;
    initech
        .assert_next("insert public.measurements through the parent")
        .await;
    initech
        .assert_next("insert public.measurements direct")
        .await;
    initech
        .assert_next("update public.measurements updated")
        .await;

    // Nothing twice: the next changes are these.
    app.run("INSERT INTO measurements VALUES (9, 'globex', 'end'), (9, 'initech', 'end')")
        .await;
    globex.assert_next("insert public.measurements end").await;
    initech.assert_next("insert public.measurements end").await;
    gw.stop().await;
}

#[tokio::test]
async fn a_partition_that_is_itself_partitioned_is_captured_at_every_level() {
    let Setup { db, app, .. } = measurements_watched().await;
    let gw = Gateway::start(&db).await;
    let mut umbrella = gw.live("umbrella").await;
    app.run(
        "CREATE TABLE measurements_umbrella PARTITION OF measurements FOR VALUES IN ('umbrella')
             PARTITION BY RANGE (id);
         CREATE TABLE measurements_umbrella_low PARTITION OF measurements_umbrella
             FOR VALUES FROM (0) TO (100);
         CREATE TABLE measurements_umbrella_high (id int NOT NULL, tenant text NOT NULL, v text);
         ALTER TABLE measurements_umbrella ATTACH PARTITION measurements_umbrella_high
             FOR VALUES FROM (100) TO (1000);",
    )
    .await;
    app.run(
        "INSERT INTO measurements VALUES (1, 'umbrella', 'root'), (101, 'umbrella', 'root high');
         INSERT INTO measurements_umbrella VALUES (2, 'umbrella', 'middle');
         INSERT INTO measurements_umbrella_low VALUES (3, 'umbrella', 'leaf');
         INSERT INTO measurements_umbrella_high VALUES (103, 'umbrella', 'leaf high');
         INSERT INTO measurements VALUES (9, 'umbrella', 'end');",
    )
    .await;
    assert_eq!(
        summaries_until_end(&mut umbrella, None).await,
        [
            "insert public.measurements root",
            "insert public.measurements root high",
            "insert public.measurements middle",
            "insert public.measurements leaf",
            "insert public.measurements leaf high",
            "insert public.measurements end",
        ]
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_detached_partition_is_no_longer_captured() {
    let Setup { db, app, admin } = setup(
        "CREATE TABLE measurements (id int, tenant text NOT NULL, v text, PRIMARY KEY (tenant, id))
             PARTITION BY LIST (tenant);
         CREATE TABLE measurements_acme PARTITION OF measurements FOR VALUES IN ('acme');
         CREATE TABLE measurements_globex PARTITION OF measurements FOR VALUES IN ('globex');
         CREATE TABLE measurements_initech PARTITION OF measurements FOR VALUES IN ('initech');
         CREATE TABLE marker (id int, tenant text NOT NULL, v text, PRIMARY KEY (tenant, id));",
    )
    .await;
    watch_by_tenant(&admin, "measurements").await;
    watch_by_tenant(&admin, "marker").await;
    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;
    let mut globex = gw.live("globex").await;
    let mut initech = gw.live("initech").await;
    app.run(
        "INSERT INTO measurements_globex VALUES (1, 'globex', 'captured');
         INSERT INTO measurements_initech VALUES (1, 'initech', 'captured');",
    )
    .await;
    globex
        .assert_next("insert public.measurements captured")
        .await;
    initech
        .assert_next("insert public.measurements captured")
        .await;

    app.run("ALTER TABLE measurements DETACH PARTITION measurements_globex")
        .await;
    // A table of its own now, it takes any tenant's rows: none may be captured.
    app.run(
        "INSERT INTO measurements_globex VALUES (2, 'globex', 'detached'), (3, 'acme', 'detached');
         UPDATE measurements_globex SET v = 'detached too';
         DELETE FROM measurements_globex;",
    )
    .await;
    // Without a transaction of its own (CONCURRENTLY cannot run in one). PostgreSQL
    // leaves a CHECK constraint in place of the partition bound.
    app.run("ALTER TABLE measurements DETACH PARTITION measurements_initech CONCURRENTLY")
        .await;
    app.run(
        "INSERT INTO measurements_initech VALUES (4, 'initech', 'detached concurrently');
         UPDATE measurements_initech SET v = 'detached too';",
    )
    .await;
    // The markers, written last, are each tenant's next event.
    app.run(
        "INSERT INTO marker VALUES (1, 'acme', 'marker'), (1, 'globex', 'marker'), (1, 'initech', 'marker')",
    )
    .await;
    for (tenant, stream) in [
        ("acme", &mut acme),
        ("globex", &mut globex),
        ("initech", &mut initech),
    ] {
        let next = stream.next_change().await;
        assert_eq!(
            op_table_v(&next),
            "insert public.marker marker",
            "{tenant}: a detached partition's write was captured: {next}"
        );
    }
    acme.assert_quiet(Duration::from_millis(300)).await;
    assert_eq!(pgfeed_triggers(&admin, "measurements_globex").await, 0);
    assert_eq!(pgfeed_triggers(&admin, "measurements_initech").await, 0);
    // Still captured: the partition left attached.
    app.run("INSERT INTO measurements VALUES (2, 'acme', 'attached')")
        .await;
    acme.assert_next("insert public.measurements attached")
        .await;
    gw.stop().await;
}

#[tokio::test]
async fn partitions_of_any_column_layout_keep_the_parents_settings() {
    let Setup { db, app, .. } = setup_watched(
        "CREATE TABLE measurements (id int, tenant text NOT NULL, v text, secret text,
                                    PRIMARY KEY (tenant, id))
             PARTITION BY LIST (tenant);
         CREATE TABLE measurements_acme PARTITION OF measurements FOR VALUES IN ('acme');",
        "SELECT pgfeed.watch('measurements', tenant_column => 'tenant', exclude_columns => '{secret}')",
    )
    .await;
    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;
    let mut globex = gw.live("globex").await;
    // Its columns in another order, and a dropped one: other attribute numbers than the
    // parent's.
    app.run(
        "CREATE TABLE measurements_globex (secret text, junk int, v text, tenant text NOT NULL, id int NOT NULL);
         ALTER TABLE measurements_globex DROP COLUMN junk;
         ALTER TABLE measurements ATTACH PARTITION measurements_globex FOR VALUES IN ('globex');
         INSERT INTO measurements (id, tenant, v, secret) VALUES (1, 'globex', 'parent', 'SECRET-1');
         INSERT INTO measurements_globex (id, tenant, v, secret) VALUES (2, 'globex', 'direct', 'SECRET-2');",
    )
    .await;
    let visible = set(&["id", "tenant", "v"]);
    for v in ["parent", "direct"] {
        let e = globex.next_change().await;
        assert_eq!(op_table_v(&e), format!("insert public.measurements {v}"));
        assert_eq!(keys(&e["new"]), visible, "{e}");
    }

    // A rename on the parent renames the column in every partition.
    app.run(
        "ALTER TABLE measurements RENAME COLUMN secret TO hidden;
         INSERT INTO measurements_acme (id, tenant, v, hidden) VALUES (3, 'acme', 'direct', 'SECRET-3');
         INSERT INTO measurements_globex (id, tenant, v, hidden) VALUES (4, 'globex', 'direct', 'SECRET-4');
         UPDATE measurements SET hidden = 'SECRET-5', v = 'updated' WHERE id IN (3, 4);",
    )
    .await;
    for (stream, tenant) in [(&mut acme, "acme"), (&mut globex, "globex")] {
        let e = stream.next_change().await;
        assert_eq!(
            op_table_v(&e),
            "insert public.measurements direct",
            "{tenant}"
        );
        assert_eq!(keys(&e["new"]), visible, "{tenant}: {e}");
        let e = stream.next_change().await;
        assert_eq!(
            op_table_v(&e),
            "update public.measurements updated",
            "{tenant}"
        );
        assert_eq!(keys(&e["new"]), visible, "{tenant}: {e}");
        assert_eq!(keys(&e["old"]), visible, "{tenant}: {e}");
        assert!(!stream.raw.contains("SECRET-"), "{tenant}: {}", stream.raw);
    }
    let entry = status_of(&db, "public.measurements").await;
    assert_eq!(entry["exclude_columns"], json!(["hidden"]), "{entry}");
    gw.stop().await;
}

#[tokio::test]
async fn watching_a_partition_or_a_table_with_inheritance_is_refused() {
    let Setup {
        db: _db,
        app: _app,
        admin,
    } = setup(&format!(
        "{MEASUREMENTS}
         CREATE TABLE base (id int PRIMARY KEY, tenant text NOT NULL);
         CREATE TABLE child (id int PRIMARY KEY, tenant text NOT NULL, extra text);
         ALTER TABLE child INHERIT base;"
    ))
    .await;
    for table in ["measurements_acme", "base", "child"] {
        let msg = fails(
            &admin,
            &format!("SELECT pgfeed.watch('{table}', tenant_column => 'tenant')"),
        )
        .await;
        assert!(msg.contains(table), "the refusal names {table}: {msg}");
    }
    let watched = query_i64(&admin, "SELECT count(*) FROM pgfeed.watched", &[]).await;
    assert_eq!(watched, 0);
}

#[tokio::test]
async fn ddl_that_would_put_a_watched_table_in_a_hierarchy_is_refused() {
    let Setup { db, app, admin } = setup_watched(
        "CREATE TABLE orders (id int, tenant text NOT NULL, v text, PRIMARY KEY (tenant, id));
         CREATE TABLE archive (id int, tenant text NOT NULL, v text, PRIMARY KEY (tenant, id))
             PARTITION BY LIST (tenant);
         CREATE TABLE legacy (id int NOT NULL, tenant text NOT NULL, v text);",
        "SELECT pgfeed.watch('orders', tenant_column => 'tenant')",
    )
    .await;

    // As a partition of a parent nobody watches, its writes would no longer be captured.
    refused(
        &app,
        "ALTER TABLE archive ATTACH PARTITION orders FOR VALUES IN ('acme')",
    )
    .await;
    // Inserts into an inheritance child are not the parent's.
    refused(&app, "CREATE TABLE orders_2024 () INHERITS (orders)").await;
    refused(&app, "ALTER TABLE legacy INHERIT orders").await;
    refused(&app, "ALTER TABLE orders INHERIT legacy").await;
    let hierarchy = query_i64(
        &admin,
        "SELECT count(*) FROM pg_inherits
             WHERE inhrelid = 'orders'::regclass OR inhparent = 'orders'::regclass",
        &[],
    )
    .await;
    assert_eq!(hierarchy, 0, "the refused statements left orders alone");

    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;
    app.run("INSERT INTO orders VALUES (1, 'acme', 'still captured')")
        .await;
    acme.assert_next("insert public.orders still captured")
        .await;
    gw.stop().await;
}

#[tokio::test]
async fn unwatching_a_partitioned_parent_stops_capture_on_its_partitions() {
    let Setup { db, app, admin } = setup(&format!(
        "{MEASUREMENTS}
         CREATE TABLE marker (id int PRIMARY KEY, tenant text NOT NULL, v text);"
    ))
    .await;
    watch_by_tenant(&admin, "measurements").await;
    watch_by_tenant(&admin, "marker").await;
    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;
    app.run("INSERT INTO measurements_acme VALUES (1, 'acme', 'watched')")
        .await;
    acme.assert_next("insert public.measurements watched").await;

    admin.run("SELECT pgfeed.unwatch('measurements')").await;
    for table in ["measurements", "measurements_acme", "measurements_globex"] {
        assert_eq!(pgfeed_triggers(&admin, table).await, 0, "{table}");
    }
    app.run(
        "INSERT INTO measurements VALUES (2, 'acme', 'unwatched');
         INSERT INTO measurements_acme VALUES (3, 'acme', 'unwatched');
         INSERT INTO marker VALUES (1, 'acme', 'marker');",
    )
    .await;
    acme.assert_next("insert public.marker marker").await;
    assert!(
        support::status_entry(&db, "public.measurements")
            .await
            .is_none()
    );

    // Watched again: captured once each, not twice.
    watch_by_tenant(&admin, "measurements").await;
    app.run(
        "INSERT INTO measurements_acme VALUES (4, 'acme', 'again');
         INSERT INTO marker VALUES (2, 'acme', 'marker 2');",
    )
    .await;
    acme.assert_next("insert public.measurements again").await;
    acme.assert_next("insert public.marker marker 2").await;
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Item 9: DROP TABLE.

#[tokio::test]
async fn dropping_a_watched_table_forgets_it() {
    let Setup { db, app, admin } = setup_watched(
        "CREATE TABLE orders (id int PRIMARY KEY, tenant text NOT NULL, v text);
         CREATE TABLE gone (id int PRIMARY KEY, tenant text NOT NULL, v text);
         CREATE SCHEMA crm;
         CREATE TABLE crm.leads (id int PRIMARY KEY, tenant text NOT NULL, v text);",
        "SELECT pgfeed.watch('orders', tenant_column => 'tenant');
             SELECT pgfeed.watch('gone', tenant_column => 'tenant');
             SELECT pgfeed.watch('crm.leads', tenant_column => 'tenant');",
    )
    .await;
    let watched = || async {
        let rows = admin
            .query(
                "SELECT tbl::oid::bigint FROM pgfeed.watched ORDER BY 1",
                &[],
            )
            .await
            .unwrap();
        rows.iter().map(|r| r.get::<_, i64>(0)).collect::<Vec<_>>()
    };
    let orders_oid = query_i64(&admin, "SELECT 'orders'::regclass::oid::bigint", &[]).await;
    assert_eq!(watched().await.len(), 3);

    // A drop that rolls back changes nothing.
    app.run("BEGIN; DROP TABLE gone; ROLLBACK").await;
    assert_eq!(watched().await.len(), 3);
    assert!(support::status_entry(&db, "public.gone").await.is_some());

    app.run("DROP TABLE gone").await;
    app.run("DROP SCHEMA crm CASCADE").await;
    assert_eq!(
        watched().await,
        [orders_oid],
        "pgfeed.watched keeps rows of dropped tables"
    );
    let status = support::status_json(&db).await;
    assert_eq!(
        support::status_tables(&status),
        ["public.orders"],
        "{status}"
    );

    // A new table of the same name is a new table: not watched.
    app.run("CREATE TABLE gone (id int PRIMARY KEY, tenant text NOT NULL, v text)")
        .await;
    assert!(support::status_entry(&db, "public.gone").await.is_none());
    assert_eq!(pgfeed_triggers(&admin, "gone").await, 0);
    // Unwatching it is a no-op (unwatch is idempotent), not an error.
    admin.run("SELECT pgfeed.unwatch('gone')").await;
    assert_eq!(pgfeed_triggers(&admin, "gone").await, 0);
    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;
    app.run(
        "INSERT INTO gone VALUES (1, 'acme', 'not watched');
         INSERT INTO orders VALUES (1, 'acme', 'marker');",
    )
    .await;
    acme.assert_next("insert public.orders marker").await;
    gw.stop().await;
}
