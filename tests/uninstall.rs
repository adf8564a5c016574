//! `pgfeed uninstall` under running gateways: refused without `--yes`; with it, the
//! gateways notice at once and say the schema is missing, and recover by themselves
//! once it is installed again.

use pgfeed_testkit as support;

use std::process::Output;

use support::{Run, SseClient, TestDb, pgfeed_cli};

/// The standard error of `o`, as text.
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Whether schema pgfeed exists in `db`.
async fn schema_exists(db: &TestDb) -> bool {
    db.client()
        .await
        .query_one("SELECT to_regnamespace('pgfeed') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0)
}

/// Reads `s` up to its `reset` event and returns it; a change before it fails the test.
async fn until_reset(s: &mut SseClient) -> support::Event {
    loop {
        let e = s.next().await.expect("the stream stays open");
        match e.event.as_str() {
            "reset" => return e,
            "change" => panic!("a change before the reset: {e:?}"),
            _ => {}
        }
    }
}

#[tokio::test]
async fn uninstall_asks_for_yes_and_gateways_report_the_missing_schema_until_reinstalled() {
    let db = TestDb::new().await;
    let (gw, mut s) = support::start_with_acme_stream(&db, "orders", &[]).await;
    let c = db.client().await;
    c.run("INSERT INTO orders (tenant, body) VALUES ('acme', 'before')")
        .await;
    assert_eq!(s.next_change().await["new"]["body"], "before");

    // Refused while a gateway listens: nothing is removed.
    let out = pgfeed_cli(&db, &["uninstall"]).await;
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("1 pgfeed gateway(s) are listening")
            && stderr(&out).contains("--yes"),
        "{}",
        stderr(&out)
    );
    assert!(schema_exists(&db).await);
    assert_eq!(support::get_soon(gw.addr, "/readyz", &[]).await.status, 200);

    // With --yes it goes ahead, with a warning.
    let out = pgfeed_cli(&db, &["uninstall", "--yes"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("warning"), "{}", stderr(&out));
    assert!(!schema_exists(&db).await);

    // The gateway notices (well before its periodic catalog reload) and says why.
    support::eventually("/readyz reports the schema missing", || async {
        support::get(gw.addr, "/readyz", &[])
            .await
            .is_ok_and(|r| r.status == 503 && r.body.contains("schema_missing"))
    })
    .await;
    let r = support::get_soon(gw.addr, "/readyz", &[]).await;
    let (code, message) = support::assert_error(&r, 503, "/readyz");
    assert_eq!(code, "schema_missing");
    assert!(
        message.contains("schema is missing") && message.contains("pgfeed install"),
        "{message}"
    );
    // Where a request needs the journal, the answer says the same.
    let token = gw.token("acme");
    let r = support::get_soon(
        gw.addr,
        "/v1/position",
        &[("Authorization", &format!("Bearer {token}"))],
    )
    .await;
    let (_, message) = support::assert_error(&r, 503, "/v1/position");
    assert!(message.contains("schema is missing"), "{message}");

    // Installed and watched again, the gateway recovers by itself. The new journal's
    // positions started over, so the open stream is told to refetch, then goes on.
    let out = pgfeed_cli(&db, &["install"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = pgfeed_cli(&db, &["watch", "orders", "--tenant-column", "tenant"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    support::until_readyz(gw.addr, 200).await;
    let reset = until_reset(&mut s).await;
    assert!(
        reset.json()["reason"]
            .as_str()
            .is_some_and(|r| r.contains("reinstalled")),
        "{reset:?}"
    );
    c.run("INSERT INTO orders (tenant, body) VALUES ('acme', 'after')")
        .await;
    let after = s.next_change().await;
    assert_eq!(after["new"]["body"], "after");
    assert_eq!(after["position"], "1.1", "positions of the new journal");
    gw.stop().await;
}

#[tokio::test]
async fn a_reinstall_the_gateway_never_saw_missing_still_restarts_positions() {
    let db = TestDb::new().await;
    let (gw, mut s) = support::start_with_acme_stream(&db, "orders", &[]).await;
    let mut c = db.client().await;
    for body in ["one", "two"] {
        c.execute(
            "INSERT INTO orders (tenant, body) VALUES ('acme', $1)",
            &[&body],
        )
        .await
        .unwrap();
        assert_eq!(s.next_change().await["new"]["body"], body);
    }

    // Removed and installed again with nothing to tell the gateway in between (no
    // doorbell, well within its periodic catalog reload); `watch` then rings it.
    pgfeed::schema::uninstall(&mut c).await.unwrap();
    pgfeed::schema::install(&mut c).await.unwrap();
    c.run("SELECT pgfeed.watch('orders', 'tenant')").await;
    let reset = until_reset(&mut s).await;
    assert_eq!(reset.json()["position"], "0.0", "{reset:?}");
    c.run("INSERT INTO orders (tenant, body) VALUES ('acme', 'three')")
        .await;
    let three = s.next_change().await;
    assert_eq!(three["new"]["body"], "three");
    assert_eq!(three["position"], "1.1", "positions of the new journal");
    support::until_readyz(gw.addr, 200).await;
    gw.stop().await;
}
