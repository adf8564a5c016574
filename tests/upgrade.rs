//! Upgrading a live database: `pgfeed install` over the schema of the previous version
//! (tests/fixtures/schema3.sql, the SQL that version installed) while the application keeps
//! committing watched writes. Nothing may be lost or duplicated, no application write may
//! fail, and the upgraded tables must follow DDL like freshly watched ones.

use pgfeed_testkit as support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use support::{Gateway, TestDb};

/// A database with the schema the previous version installed (tests/fixtures/schema3.sql)
/// where `app_sql` then ran, and a connection to it.
async fn schema_3_with(app_sql: &str) -> (TestDb, tokio_postgres::Client) {
    let db = TestDb::empty().await;
    let c = db.client().await;
    c.batch_execute(include_str!("fixtures/schema3.sql"))
        .await
        .expect("the schema-3 fixture applies");
    c.batch_execute(app_sql)
        .await
        .unwrap_or_else(|e| panic!("`{app_sql}`: {}", support::server_message(&e)));
    (db, c)
}

#[tokio::test]
async fn install_over_schema_3_with_writers_committing_loses_and_duplicates_nothing() {
    let (db, c) = schema_3_with(
        "CREATE TABLE orders (id serial PRIMARY KEY, tenant text NOT NULL, body text, secret text);
         SELECT pgfeed.watch('orders', 'tenant', '{secret}');
         INSERT INTO orders (tenant, body, secret) VALUES ('acme', 'before', 's');",
    )
    .await;

    // Writers commit one row per transaction, as fast as they can, before, during and
    // after the upgrade; every id they saw committed must come out exactly once.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for _ in 0..3 {
        let (client, stop) = (db.client().await, Arc::clone(&stop));
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let row = client
                    .query_one(
                        "INSERT INTO orders (tenant, body, secret) VALUES ('acme', 'during', 's')
                         RETURNING id",
                        &[],
                    )
                    .await
                    .expect("an application write fails during the upgrade");
                ids.push(row.get::<_, i32>(0));
            }
            ids
        }));
    }
    support::eventually("writers are committing", || async {
        c.query_one("SELECT count(*) FROM orders", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            > 20
    })
    .await;
    let mut admin = db.client().await;
    let done = pgfeed::schema::install(&mut admin)
        .await
        .expect("install over schema 3");
    assert_eq!((done.from, done.to), (3, pgfeed::schema::VERSION));
    let at_upgrade: i64 = c
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    support::eventually("writers commit after the upgrade", || async {
        c.query_one("SELECT count(*) FROM orders", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            > at_upgrade + 20
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut committed: BTreeSet<i32> = BTreeSet::from([1]);
    for w in writers {
        committed.extend(w.await.unwrap());
    }

    // The upgraded table follows DDL: the excluded column keeps its role under a new name.
    c.batch_execute(
        "ALTER TABLE orders RENAME COLUMN secret TO hidden;
         INSERT INTO orders (tenant, body, hidden) VALUES ('acme', 'after', 'h');",
    )
    .await
    .unwrap();
    let last: i32 = c
        .query_one("SELECT max(id) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    committed.insert(last);

    let gw = Gateway::start(&db).await;
    let mut s = gw.resume("acme", "", "0.0").await;
    // Everything is in the journal by now: the replay before `live` holds it all.
    let changes = s.until_live().await;
    let mut seen = BTreeSet::new();
    let mut previous: Option<(i64, i32)> = None;
    for e in &changes {
        let (commit, ord) = e["position"]
            .as_str()
            .and_then(|p| p.split_once('.'))
            .map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap()))
            .expect("a position");
        assert!(previous < Some((commit, ord)), "positions go backwards");
        previous = Some((commit, ord));
        let new = &e["new"];
        assert!(
            new.get("secret").is_none() && new.get("hidden").is_none(),
            "an excluded column left the database: {e}"
        );
        let id = new["id"].as_i64().unwrap() as i32;
        assert!(seen.insert(id), "change of row {id} delivered twice");
    }
    assert_eq!(seen, committed);
    gw.stop().await;
}

/// Schema 3 kept excluded columns in the order `watch` was given them; an upgraded table
/// whose excluded column is dropped and added again must keep it out like a fresh one
/// (migration 8 puts the names in column order before pairing them with their numbers).
#[tokio::test]
async fn an_upgraded_table_keeps_a_dropped_and_re_added_excluded_column_out() {
    let (db, c) = schema_3_with(
        "CREATE TABLE u (id int PRIMARY KEY, tenant text NOT NULL, a text, b text);
         SELECT pgfeed.watch('u', 'tenant', '{b,a}');",
    )
    .await;
    let mut admin = db.client().await;
    pgfeed::schema::install(&mut admin)
        .await
        .expect("the upgrade");
    c.batch_execute(
        "ALTER TABLE u DROP COLUMN a, ADD COLUMN a text;
         INSERT INTO u VALUES (1, 'acme', 'SECRET-B', 'SECRET-A');",
    )
    .await
    .unwrap();
    let leaked = support::query_i64(
        &c,
        "SELECT count(*) FROM pgfeed.changes WHERE new::text LIKE '%SECRET%'",
        &[],
    )
    .await;
    let captured = support::query_i64(&c, "SELECT count(*) FROM pgfeed.changes", &[]).await;
    assert_eq!(
        (captured, leaked),
        (1, 0),
        "an excluded value was journaled"
    );
}
