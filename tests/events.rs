//! The event shape of every op, no-op updates, excluded columns, transactions that roll
//! back, and exact numerics: real writes, a real gateway, real HTTP.

use pgfeed_testkit as support;

use std::time::Duration;

use serde_json::json;
use support::{Gateway, TestDb};

#[tokio::test]
async fn each_op_has_its_shape() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, tenant text NOT NULL, status text, amount numeric);
         SELECT pgfeed.watch('orders', 'tenant');",
    )
    .await
    .unwrap();
    let gw = Gateway::start(&db).await;
    let mut s = gw.stream("acme", "").await;
    assert_eq!(s.status, 200);
    assert_eq!(
        s.headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .unwrap()
            .1,
        "text/event-stream"
    );
    let live = s.next().await.unwrap();
    assert_eq!(live.event, "live");
    assert!(live.json()["position"].is_string());
    assert_eq!(
        s.retries,
        vec!["2000".to_string()],
        "the first frame carries retry:"
    );

    c.batch_execute(
        "INSERT INTO orders VALUES (42, 'acme', 'new', 123456789012345678901234567890.123456)",
    )
    .await
    .unwrap();
    let ins = s.next_change().await;
    assert_eq!(ins["table"], "public.orders");
    assert_eq!(ins["op"], "insert");
    assert_eq!(ins["tenant"], "acme");
    assert_eq!(ins["pk"], json!({"id": 42}));
    assert_eq!(ins["new"]["status"], "new");
    assert!(
        ins.get("old").is_none() && ins.get("changed").is_none(),
        "{ins}"
    );
    // Every digit of the numeric survives, as PostgreSQL's to_jsonb renders it.
    assert!(
        s.raw
            .contains("\"amount\": 123456789012345678901234567890.123456"),
        "{}",
        s.raw
    );
    let committed_at = ins["committed_at"].as_str().unwrap();
    assert!(
        committed_at.ends_with('Z') && committed_at.len() == 27,
        "{committed_at}"
    );

    c.batch_execute("UPDATE orders SET status = 'paid' WHERE id = 42")
        .await
        .unwrap();
    let upd = s.next_change().await;
    assert_eq!(upd["op"], "update");
    assert_eq!(upd["new"]["status"], "paid");
    assert_eq!(upd["old"]["status"], "new");
    assert_eq!(upd["changed"], json!(["status"]));
    assert_eq!(upd["pk"], json!({"id": 42}));

    c.batch_execute("DELETE FROM orders WHERE id = 42")
        .await
        .unwrap();
    let del = s.next_change().await;
    assert_eq!(del["op"], "delete");
    assert_eq!(del["old"]["status"], "paid");
    assert_eq!(del["pk"], json!({"id": 42}));
    assert!(del.get("new").is_none(), "{del}");

    c.batch_execute("TRUNCATE orders").await.unwrap();
    let tr = s.next_change().await;
    assert_eq!(tr["op"], "truncate");
    assert_eq!(tr["table"], "public.orders");
    for absent in ["pk", "new", "old"] {
        assert!(tr.get(absent).is_none(), "truncate has no {absent}: {tr}");
    }

    let positions: Vec<String> = [&ins, &upd, &del, &tr]
        .iter()
        .map(|e| e["position"].as_str().unwrap().to_string())
        .collect();
    let parsed: Vec<pgfeed::change::Position> =
        positions.iter().map(|p| p.parse().unwrap()).collect();
    assert!(
        parsed.windows(2).all(|w| w[0] < w[1]),
        "positions increase: {positions:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn noop_update_sends_nothing_and_excluded_columns_never_leave() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY, tenant text NOT NULL, name text, password_hash text);
         SELECT pgfeed.watch('users', 'tenant', exclude_columns => '{password_hash}');",
    )
    .await
    .unwrap();
    let gw = Gateway::start(&db).await;
    let mut s = gw.stream("acme", "").await;
    s.until_live().await;

    c.batch_execute("INSERT INTO users VALUES (1, 'acme', 'ann', 'hunter2-hash')")
        .await
        .unwrap();
    let ins = s.next_change().await;
    assert_eq!(
        ins["new"],
        json!({"id": 1, "tenant": "acme", "name": "ann"})
    );

    // Changes nothing, then changes only an excluded column: neither is an event.
    c.batch_execute("UPDATE users SET name = name")
        .await
        .unwrap();
    c.batch_execute("UPDATE users SET password_hash = 'other-hash'")
        .await
        .unwrap();
    c.batch_execute("UPDATE users SET name = 'anne'")
        .await
        .unwrap();
    let upd = s.next_change().await;
    assert_eq!(
        upd["changed"],
        json!(["name"]),
        "the first event after the no-ops is the real update"
    );
    assert!(
        !s.raw.contains("hash"),
        "excluded values reached the stream: {}",
        s.raw
    );

    // Nor are they in the journal.
    let leaked: i64 = c
        .query_one(
            "SELECT count(*) FROM pgfeed.changes WHERE new::text LIKE '%hash%' OR old::text LIKE '%hash%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0);
    assert_eq!(
        support::journal_len(&c).await,
        2,
        "no-op updates write no journal rows"
    );
    gw.stop().await;
}

#[tokio::test]
async fn only_committed_changes_are_captured() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start(&db).await;
    let mut s = gw.stream("acme", "").await;
    s.until_live().await;
    let mut c = db.client().await;

    let tx = c.transaction().await.unwrap();
    tx.batch_execute("INSERT INTO notes (tenant, body) VALUES ('acme', 'rolled back')")
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let tx = c.transaction().await.unwrap();
    tx.batch_execute(
        "INSERT INTO notes (tenant, body) VALUES ('acme', 'kept 1');
         SAVEPOINT s;
         INSERT INTO notes (tenant, body) VALUES ('acme', 'undone');
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO notes (tenant, body) VALUES ('acme', 'kept 2');",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    // The transaction's first capture is rolled back with its savepoint: the commit is
    // still sealed (once), by the first change that stays.
    let tx = c.transaction().await.unwrap();
    tx.batch_execute(
        "SAVEPOINT s;
         INSERT INTO notes (tenant, body) VALUES ('acme', 'undone first');
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO notes (tenant, body) VALUES ('acme', 'kept 3'), ('acme', 'kept 4');",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let a = s.next_change().await;
    let b = s.next_change().await;
    assert_eq!(a["new"]["body"], "kept 1");
    assert_eq!(b["new"]["body"], "kept 2");
    let third = s.next_change().await;
    let fourth = s.next_change().await;
    assert_eq!(third["new"]["body"], "kept 3");
    assert_eq!(fourth["new"]["body"], "kept 4");
    s.assert_quiet(Duration::from_millis(300)).await;
    assert!(!s.raw.contains("rolled back") && !s.raw.contains("undone"));
    // One commit row per committed transaction that captured something, counting what
    // stayed; nothing for the rolled-back one.
    let commits: Vec<i32> = c
        .query("SELECT n FROM pgfeed.commits ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(commits, vec![2, 2]);
    gw.stop().await;
}

#[tokio::test]
async fn public_tables_reach_every_tenant_and_tenant_moves_are_split() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE announcements (id int PRIMARY KEY, text text);
         SELECT pgfeed.watch('announcements', public => true);
         CREATE TABLE docs (id int PRIMARY KEY, tenant text NOT NULL, title text);
         SELECT pgfeed.watch('docs', 'tenant');",
    )
    .await
    .unwrap();
    let gw = Gateway::start(&db).await;
    let mut a = gw.stream("acme", "").await;
    let mut g = gw.stream("globex", "").await;
    a.until_live().await;
    g.until_live().await;

    c.batch_execute("INSERT INTO announcements VALUES (1, 'hello all')")
        .await
        .unwrap();
    assert_eq!(a.next_change().await["new"]["text"], "hello all");
    assert_eq!(g.next_change().await["new"]["text"], "hello all");

    // A row that moves from acme to globex: acme sees it leave, globex sees it arrive,
    // and neither sees the other's version of it.
    c.batch_execute("INSERT INTO docs VALUES (7, 'acme', 'plan')")
        .await
        .unwrap();
    assert_eq!(a.next_change().await["op"], "insert");
    c.batch_execute("UPDATE docs SET tenant = 'globex', title = 'globex plan' WHERE id = 7")
        .await
        .unwrap();
    let left = a.next_change().await;
    assert_eq!(left["op"], "delete");
    assert_eq!(left["old"]["title"], "plan");
    let arrived = g.next_change().await;
    assert_eq!(arrived["op"], "insert");
    assert_eq!(arrived["new"]["title"], "globex plan");
    a.assert_quiet(Duration::from_millis(300)).await;
    assert!(
        !a.raw.contains("globex plan"),
        "acme saw globex's row: {}",
        a.raw
    );
    gw.stop().await;
}

#[tokio::test]
async fn single_and_multi_row_statements_journal_the_same_shape() {
    // Capture journals a statement that changed one row with INSERT ... VALUES and one
    // that changed several with INSERT ... SELECT: both must give the same events, with a
    // composite key, an excluded column, and for a public table.
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE lines (region text, tenant text NOT NULL, no int, note text, secret text,
                             PRIMARY KEY (no, region));
         SELECT pgfeed.watch('lines', 'tenant', exclude_columns => '{secret}');
         CREATE TABLE notices (id int PRIMARY KEY, body text);
         SELECT pgfeed.watch('notices', public => true);",
    )
    .await
    .unwrap();
    let gw = Gateway::start(&db).await;
    let mut s = gw.stream("acme", "").await;
    s.until_live().await;

    c.batch_execute(
        "INSERT INTO lines VALUES ('eu', 'acme', 1, 'one', 's1');
         INSERT INTO lines VALUES ('eu', 'acme', 2, 'two', 's2'), ('us', 'acme', 2, 'three', 's3');
         INSERT INTO notices VALUES (1, 'hello');
         INSERT INTO notices VALUES (2, 'a'), (3, 'b');
         DELETE FROM lines WHERE no = 1;
         DELETE FROM lines WHERE no = 2;
         DELETE FROM notices WHERE id = 1;
         DELETE FROM notices WHERE id > 1;",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    for _ in 0..12 {
        let e = s.next_change().await;
        let image = if e["op"] == "insert" {
            &e["new"]
        } else {
            &e["old"]
        };
        got.push(json!([e["table"], e["op"], e["tenant"], e["pk"], image]));
    }
    let line = |region: &str, no: i32, note: &str| json!({"region": region, "tenant": "acme", "no": no, "note": note});
    let notice = |id: i32, body: &str| json!({"id": id, "body": body});
    let want = vec![
        json!(["public.lines", "insert", "acme", {"no": 1, "region": "eu"}, line("eu", 1, "one")]),
        json!(["public.lines", "insert", "acme", {"no": 2, "region": "eu"}, line("eu", 2, "two")]),
        json!(["public.lines", "insert", "acme", {"no": 2, "region": "us"}, line("us", 2, "three")]),
        json!(["public.notices", "insert", null, {"id": 1}, notice(1, "hello")]),
        json!(["public.notices", "insert", null, {"id": 2}, notice(2, "a")]),
        json!(["public.notices", "insert", null, {"id": 3}, notice(3, "b")]),
        json!(["public.lines", "delete", "acme", {"no": 1, "region": "eu"}, line("eu", 1, "one")]),
        json!(["public.lines", "delete", "acme", {"no": 2, "region": "eu"}, line("eu", 2, "two")]),
        json!(["public.lines", "delete", "acme", {"no": 2, "region": "us"}, line("us", 2, "three")]),
        json!(["public.notices", "delete", null, {"id": 1}, notice(1, "hello")]),
        json!(["public.notices", "delete", null, {"id": 2}, notice(2, "a")]),
        json!(["public.notices", "delete", null, {"id": 3}, notice(3, "b")]),
    ];
    assert_eq!(got, want);
    assert!(!s.raw.contains("s1") && !s.raw.contains("s2"), "{}", s.raw);

    // Updates, one row and several, tenant moves of several rows, a table of key columns
    // only, wide tables, and a table whose key column was renamed after watch():
    // multi-row statements take each key by subtracting the other columns, or (wide
    // tables) build it from the key column, or aggregate it (composite keys of wide
    // tables), and must give the keys one-row statements give. Rows of one statement may
    // come in any order (the scan's), so both lists are compared sorted.
    c.batch_execute(
        "INSERT INTO lines VALUES ('eu', 'acme', 5, 'five', 's5'), ('us', 'acme', 5, 'six', 's6');
         UPDATE lines SET note = 'FIVE' WHERE no = 5 AND region = 'eu';
         UPDATE lines SET note = note || '!' WHERE no = 5;
         UPDATE lines SET tenant = 'globex' WHERE no = 5;
         UPDATE lines SET tenant = 'acme' WHERE no = 5;
         CREATE TABLE pairs (tenant text, a int, b int, PRIMARY KEY (tenant, a, b));
         SELECT pgfeed.watch('pairs', 'tenant');
         INSERT INTO pairs VALUES ('acme', 1, 1), ('acme', 1, 2);
         UPDATE pairs SET b = b + 10;
         CREATE TABLE wide1 (id int PRIMARY KEY, tenant text, c1 int, c2 int, c3 int, c4 int,
                             c5 int, c6 int, c7 int, c8 int, c9 int);
         SELECT pgfeed.watch('wide1', 'tenant');
         INSERT INTO wide1 (id, tenant) VALUES (1, 'acme'), (2, 'acme');
         CREATE TABLE wide2 (a int, b int, tenant text, c1 int, c2 int, c3 int, c4 int,
                             c5 int, c6 int, c7 int, c8 int, c9 int, PRIMARY KEY (a, b));
         SELECT pgfeed.watch('wide2', 'tenant');
         INSERT INTO wide2 (a, b, tenant) VALUES (1, 2, 'acme'), (3, 4, 'acme');
         CREATE TABLE renamed (id int PRIMARY KEY, tenant text NOT NULL, v text);
         SELECT pgfeed.watch('renamed', 'tenant');
         ALTER TABLE renamed RENAME COLUMN id TO ident;
         INSERT INTO renamed VALUES (1, 'acme', 'a');
         INSERT INTO renamed VALUES (2, 'acme', 'b'), (3, 'acme', 'c');
         UPDATE renamed SET v = v || '!' WHERE ident = 1;
         UPDATE renamed SET v = v || '?';",
    )
    .await
    .unwrap();
    let eu5 = json!({"no": 5, "region": "eu"});
    let us5 = json!({"no": 5, "region": "us"});
    let pair = |b: i32| json!({"tenant": "acme", "a": 1, "b": b});
    let ident = |n: i32| json!({ "ident": n });
    let mut want = vec![
        json!(["public.lines", "insert", eu5, null]),
        json!(["public.lines", "insert", us5, null]),
        json!(["public.lines", "update", eu5, ["note"]]),
        json!(["public.lines", "update", eu5, ["note"]]),
        json!(["public.lines", "update", us5, ["note"]]),
        // to globex: acme sees both rows leave; back to acme: both arrive
        json!(["public.lines", "delete", eu5, null]),
        json!(["public.lines", "delete", us5, null]),
        json!(["public.lines", "insert", eu5, null]),
        json!(["public.lines", "insert", us5, null]),
        json!(["public.pairs", "insert", pair(1), null]),
        json!(["public.pairs", "insert", pair(2), null]),
        json!(["public.pairs", "update", pair(11), ["b"]]),
        json!(["public.pairs", "update", pair(12), ["b"]]),
        json!(["public.wide1", "insert", {"id": 1}, null]),
        json!(["public.wide1", "insert", {"id": 2}, null]),
        json!(["public.wide2", "insert", {"a": 1, "b": 2}, null]),
        json!(["public.wide2", "insert", {"a": 3, "b": 4}, null]),
        // The key column's rename reached the triggers (schema 4's DDL event trigger):
        // the keys carry its new name, not a null under the old one.
        json!(["public.renamed", "insert", ident(1), null]),
        json!(["public.renamed", "insert", ident(2), null]),
        json!(["public.renamed", "insert", ident(3), null]),
        json!(["public.renamed", "update", ident(1), ["v"]]),
        json!(["public.renamed", "update", ident(1), ["v"]]),
        json!(["public.renamed", "update", ident(2), ["v"]]),
        json!(["public.renamed", "update", ident(3), ["v"]]),
    ];
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let e = s.next_change().await;
        got.push(json!([e["table"], e["op"], e["pk"], e["changed"]]));
    }
    s.assert_quiet(Duration::from_millis(300)).await;
    let key = |v: &serde_json::Value| v.to_string();
    got.sort_by_key(key);
    want.sort_by_key(key);
    assert_eq!(got, want);
    gw.stop().await;
}
