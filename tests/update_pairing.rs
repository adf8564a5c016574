//! A multi-row UPDATE journals each row's old and new images together: capture pairs the
//! n-th row of the old transition table with the n-th of the new one (pairing by key would
//! break when the key itself changes). PostgreSQL does not document that order, so it is
//! proven here over the updates that could disturb it: rows moved to other pages (non-HOT,
//! a wider row that no longer fits), HOT updates in place, updates of the key itself,
//! rows visited in a random order (a join), rows moved between partitions, and a table
//! with a row trigger of its own that skips some rows. Every row carries a `tag` that no
//! statement changes: in every update event, `old.tag` must equal `new.tag`, and the
//! event's `pk` must be the new row's key.

use pgfeed_testkit as support;

use std::collections::HashMap;

use support::{Run, TestDb};

/// Rows per table: several pages of them.
const ROWS: i32 = 3000;

/// Each update event of the journal as (old tag, new tag, pk, new key).
async fn update_events(
    c: &tokio_postgres::Client,
    table: &str,
    key: &str,
) -> Vec<(String, String, serde_json::Value, serde_json::Value)> {
    c.query(
        "SELECT old ->> 'tag', new ->> 'tag', pk::text,
                jsonb_build_object($2::text, new -> $2::text)::text
           FROM pgfeed.changes WHERE op = 'update' AND table_name = $1 ORDER BY xid, ord",
        &[&table, &key],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        let json = |i| serde_json::from_str(r.get(i)).unwrap();
        (r.get(0), r.get(1), json(2), json(3))
    })
    .collect()
}

/// Checks every update event of `table` pairs the images of one row, and that there are
/// `expected` of them; then forgets them.
async fn assert_paired(
    c: &tokio_postgres::Client,
    table: &str,
    key: &str,
    expected: usize,
    what: &str,
) {
    let events = update_events(c, table, key).await;
    assert_eq!(events.len(), expected, "{what}: one update event per row");
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (old, new, pk, new_key) in &events {
        assert_eq!(
            old, new,
            "{what}: an update's old and new images are of one row"
        );
        if key != "*" {
            assert_eq!(pk, new_key, "{what}: the key is the new row's");
        }
        *seen.entry(new.as_str()).or_default() += 1;
    }
    assert!(seen.values().all(|&n| n == 1), "{what}: each row once");
    c.run("DELETE FROM pgfeed.changes WHERE op = 'update'")
        .await;
}

#[tokio::test]
async fn old_and_new_images_of_a_multi_row_update_are_of_the_same_row() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.run(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, tag text NOT NULL, tenant text NOT NULL,
                         n int NOT NULL DEFAULT 0, pad text) WITH (fillfactor = 60);
         SELECT pgfeed.watch('t', 'tenant');
         INSERT INTO t (id, tag, tenant, pad)
             SELECT i, 'tag-' || i, 'acme', repeat(md5(i::text), 1 + i % 5)
             FROM generate_series(1, {ROWS}) AS i;"
    ))
    .await;
    let rows = ROWS as usize;

    // In place (HOT: no indexed column changes, room left by the fill factor), counted
    // within the transaction.
    c.run("BEGIN; UPDATE t SET n = n + 1").await;
    let hot = support::query_i64(
        &c,
        "SELECT pg_stat_get_xact_tuples_hot_updated('t'::regclass)",
        &[],
    )
    .await;
    c.run("COMMIT").await;
    assert_paired(&c, "public.t", "id", rows, "HOT updates").await;

    // Moved to other pages: every third row grows past what its page holds.
    c.run("UPDATE t SET pad = repeat(md5(id::text), 40) WHERE id % 3 = 0")
        .await;
    assert_paired(&c, "public.t", "id", rows / 3, "rows moved to other pages").await;

    // Mixed: some rows grow, some shrink, in one statement.
    c.run("UPDATE t SET pad = CASE WHEN id % 2 = 0 THEN repeat('y', 900) ELSE NULL END")
        .await;
    assert_paired(&c, "public.t", "id", rows, "rows growing and shrinking").await;

    // Rows visited in a random order, through a join.
    c.run(
        "UPDATE t SET n = t.n + r.k
           FROM (SELECT id, (random() * 10)::int + 1 AS k FROM t ORDER BY random()) AS r
          WHERE t.id = r.id",
    )
    .await;
    assert_paired(&c, "public.t", "id", rows, "rows in random order").await;

    // The key itself changes (non-HOT: an indexed column), in the reverse of its order.
    c.run("UPDATE t SET id = 2 * id + 100000").await;
    assert_paired(&c, "public.t", "id", rows, "keys changed").await;

    // A row trigger of the application's that skips every fifth row.
    c.run(
        "CREATE FUNCTION skip_fifth() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.id % 5 = 0 THEN RETURN NULL; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER skip_fifth BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION skip_fifth();",
    )
    .await;
    c.run("UPDATE t SET n = n + 1, pad = CASE WHEN id % 7 = 0 THEN repeat('z', 1500) END")
        .await;
    let skipped = rows / 5;
    assert_paired(
        &c,
        "public.t",
        "id",
        rows - skipped,
        "some rows skipped by a trigger",
    )
    .await;
    assert!(hot > 0, "some updates were HOT");
}

#[tokio::test]
async fn rows_moved_between_partitions_keep_their_pairs() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.run(&format!(
        "CREATE TABLE p (id int NOT NULL, part int NOT NULL, tag text NOT NULL,
                         tenant text NOT NULL, pad text, PRIMARY KEY (id, part))
             PARTITION BY LIST (part);
         CREATE TABLE p0 PARTITION OF p FOR VALUES IN (0);
         CREATE TABLE p1 PARTITION OF p FOR VALUES IN (1);
         CREATE TABLE p2 PARTITION OF p FOR VALUES IN (2);
         SELECT pgfeed.watch('p', 'tenant');
         INSERT INTO p (id, part, tag, tenant, pad)
             SELECT i, i % 3, 'tag-' || i, 'acme', repeat('x', i % 50)
             FROM generate_series(1, {ROWS}) AS i;"
    ))
    .await;
    let rows = ROWS as usize;
    // Every row to the next partition: a delete from one and an insert into another each.
    c.run("UPDATE p SET part = (part + 1) % 3").await;
    assert_paired(&c, "public.p", "*", rows, "rows moved between partitions").await;
    // Some rows move, others stay, some grow, in a random order.
    c.run(
        "UPDATE p SET part = CASE WHEN p.id % 2 = 0 THEN (p.part + 1) % 3 ELSE p.part END,
                      pad = CASE WHEN p.id % 3 = 0 THEN repeat('w', 1200) ELSE p.pad END
           FROM (SELECT id FROM p ORDER BY random()) AS r
          WHERE p.id = r.id",
    )
    .await;
    assert_paired(
        &c,
        "public.p",
        "*",
        // Rows neither moved nor grown (odd ids not divisible by 3) changed nothing.
        rows * 2 / 3,
        "some rows moved, in random order",
    )
    .await;
    // The events name the parent, and each row's key (id, part) is its new one.
    let keys: i64 = support::query_i64(
        &c,
        "SELECT count(*) FROM pgfeed.changes
          WHERE op = 'insert' AND table_name = 'public.p' AND pk ? 'part'",
        &[],
    )
    .await;
    assert_eq!(
        keys as usize, rows,
        "inserts of the parent, keyed by (id, part)"
    );
}
