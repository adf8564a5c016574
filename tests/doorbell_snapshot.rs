//! The doorbell and transactions that read with one snapshot (REPEATABLE READ and
//! SERIALIZABLE). A watched transaction decides at commit whether to ring; had it read a
//! table for that (as an earlier design did), in these isolation levels it would read it
//! as it was when the transaction started, not as it is at commit. Neither failing the application's commit
//! nor sleeping through its change is acceptable (SPEC section 1: capture never fails the
//! application's write; a missing doorbell at worst delays a change until the health check,
//! which is set out of reach here).

use pgfeed_testkit as support;

use std::time::Duration;

use support::{Gateway, Run, TestDb};

/// Well beyond anything the doorbell should take, well below the health interval.
const PROMPTLY: Duration = Duration::from_secs(3);

/// The gateway's settings: the health check (which would pick up a change nobody rang
/// for) out of reach.
fn slow_health(db: &TestDb) -> pgfeed::config::Sources {
    support::sources_with(db, &[("PGFEED_DATABASE_HEALTH_INTERVAL", "60s")])
}

/// Waits until the gateway sleeps: pgfeed.armed is set.
async fn until_asleep(c: &tokio_postgres::Client) {
    support::eventually("the gateway sleeps", || async {
        support::query_i64(c, "SELECT last_value FROM pgfeed.armed", &[]).await == 1
    })
    .await;
}

/// The body of the next change on `s`, which must come within [`PROMPTLY`].
async fn next_body(s: &mut support::SseClient, what: &str) -> String {
    let e = tokio::time::timeout(PROMPTLY, s.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing delivered within {PROMPTLY:?}"))
        .expect("the stream goes on");
    assert_eq!(e.event, "change", "{e:?}");
    e.json()["new"]["body"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_repeatable_read_commit_is_not_failed_by_the_doorbell() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start_with(slow_health(&db)).await;
    let mut s = gw.live("acme").await;
    let c = db.client().await;
    until_asleep(&c).await;

    // A starts while the gateway sleeps...
    let mut a = db.client().await;
    let t = support::repeatable_read(&mut a).await;
    t.run("INSERT INTO orders (tenant, body) VALUES ('acme', 'a')")
        .await;
    // ...another commit rings, the gateway wakes, reads, and sleeps again...
    c.run("INSERT INTO orders (tenant, body) VALUES ('acme', 'b')")
        .await;
    assert_eq!(next_body(&mut s, "b").await, "b");
    until_asleep(&c).await;
    // ...and A commits, as it would without pgfeed.
    t.commit().await.unwrap_or_else(|e| {
        panic!(
            "a REPEATABLE READ transaction with no conflict of its own failed at COMMIT: {}",
            support::server_message(&e)
        )
    });
    assert_eq!(next_body(&mut s, "a").await, "a");
    gw.stop().await;
}

#[tokio::test]
async fn a_repeatable_read_transaction_older_than_the_gateways_sleep_rings() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;

    // A starts before the gateway, so its snapshot shows no gateway asleep...
    let mut a = db.client().await;
    let t = support::repeatable_read(&mut a).await;
    t.run("INSERT INTO orders (tenant, body) VALUES ('acme', 'a')")
        .await;
    // ...then the gateway starts, reads everything and goes to sleep...
    let gw = Gateway::start_with(slow_health(&db)).await;
    let mut s = gw.live("acme").await;
    until_asleep(&db.client().await).await;
    // ...and A commits: it must ring.
    t.commit().await.unwrap();
    let what = "the commit of a transaction that started before the gateway slept rings";
    assert_eq!(next_body(&mut s, what).await, "a");
    gw.stop().await;
}
