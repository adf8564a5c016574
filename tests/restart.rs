//! PostgreSQL restarted (`pg_ctl restart -m fast`) under a live stream with writes going on.
//! Its own test binary, because restarting the cluster cuts every connection of every test
//! that shares it.

use pgfeed_testkit as support;

use std::time::Duration;

use support::{Gateway, TestDb};

#[tokio::test]
async fn postgres_restart_loses_and_duplicates_nothing() {
    assert!(
        support::server().cluster.is_some(),
        "this test restarts PostgreSQL, so it needs the cluster the tests start themselves: \
         unset PGFEED_TEST_DATABASE_URL to run it"
    );
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start(&db).await;
    let mut s = gw.stream("acme", "").await;
    s.until_live().await;

    // A writer that keeps going through the restart, reconnecting as an application would.
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (url, stop) = (db.url.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.is_cancelled() {
                let Ok((c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                tokio::spawn(conn);
                while !stop.is_cancelled() {
                    i += 1;
                    let body = format!("w{i}");
                    if c.execute(
                        "INSERT INTO orders (tenant, body) VALUES ('acme', $1)",
                        &[&body],
                    )
                    .await
                    .is_err()
                    {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
            }
        })
    };

    let mut last: Option<pgfeed::change::Position> = None;
    let mut received = Vec::new();
    let mut take = |e: serde_json::Value, received: &mut Vec<String>| {
        let p: pgfeed::change::Position = e["position"].as_str().unwrap().parse().unwrap();
        assert!(
            last.is_none_or(|l| p > l),
            "position {p} out of order or duplicated"
        );
        last = Some(p);
        received.push(e["new"]["body"].as_str().unwrap().to_string());
    };
    for _ in 0..20 {
        take(s.next_change().await, &mut received);
    }

    let restart =
        tokio::task::spawn_blocking(|| support::server().cluster.as_ref().unwrap().restart());
    // While PostgreSQL is down the gateway must say so.
    // /readyz reports the outage.
    support::until_readyz(gw.addr, 503).await;
    restart.await.unwrap().expect("pg_ctl restart");
    support::until_readyz(gw.addr, 200).await;
    // Some writes after the restart, then stop the writer.
    let after = received.len();
    while received.len() < after + 20 {
        take(s.next_change().await, &mut received);
    }
    stop.cancel();
    writer.await.unwrap();

    let c = db.client().await;
    let expected: Vec<String> = c
        .query(
            "SELECT body FROM orders WHERE tenant = 'acme' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    while received.len() < expected.len() {
        take(s.next_change().await, &mut received);
    }
    assert_eq!(
        received, expected,
        "every committed row exactly once, in commit order"
    );
    s.assert_quiet(Duration::from_millis(300)).await;
    gw.stop().await;
}
