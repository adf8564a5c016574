//! `pgfeed uninstall` under running gateways: refused without `--yes`; with it, the
//! gateways notice at once and say the schema is missing, and recover by themselves
//! once it is installed again.

mod support;

use std::process::{Command, Output};

use support::{Gateway, SECRET, TestDb};

fn pgfeed(db: &TestDb, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgfeed"));
    cmd.args(args)
        .env("DATABASE_URL", &db.url)
        .env("PGFEED_AUTH_SECRET", SECRET);
    for (k, _) in std::env::vars() {
        if k.starts_with("PGFEED_") && !k.starts_with("PGFEED_TEST_") && k != "PGFEED_AUTH_SECRET" {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("running pgfeed")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

async fn schema_exists(db: &TestDb) -> bool {
    db.client()
        .await
        .query_one("SELECT to_regnamespace('pgfeed') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn uninstall_asks_for_yes_and_gateways_report_the_missing_schema_until_reinstalled() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start(&db).await;
    let mut s = gw.stream("acme", "").await;
    s.until_live().await;
    let c = db.client().await;
    c.batch_execute("INSERT INTO orders (tenant, body) VALUES ('acme', 'before')")
        .await
        .unwrap();
    assert_eq!(s.next_change().await["new"]["body"], "before");

    // Refused while a gateway listens: nothing is removed.
    let out = pgfeed(&db, &["uninstall"]);
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
    let out = pgfeed(&db, &["uninstall", "--yes"]);
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
    let out = pgfeed(&db, &["install"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = pgfeed(&db, &["watch", "orders", "--tenant-column", "tenant"]);
    assert!(out.status.success(), "{}", stderr(&out));
    support::until_readyz(gw.addr, 200).await;
    let reset = loop {
        let e = s.next().await.expect("the stream stays open");
        match e.event.as_str() {
            "reset" => break e,
            "change" => panic!("a change before the reset: {e:?}"),
            _ => {}
        }
    };
    assert!(
        reset.json()["reason"]
            .as_str()
            .is_some_and(|r| r.contains("reinstalled")),
        "{reset:?}"
    );
    c.batch_execute("INSERT INTO orders (tenant, body) VALUES ('acme', 'after')")
        .await
        .unwrap();
    let after = s.next_change().await;
    assert_eq!(after["new"]["body"], "after");
    assert_eq!(after["position"], "1.1", "positions of the new journal");
    gw.stop().await;
}

#[tokio::test]
async fn a_reinstall_the_gateway_never_saw_missing_still_restarts_positions() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "orders").await;
    let gw = Gateway::start(&db).await;
    let mut s = gw.stream("acme", "").await;
    s.until_live().await;
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
    c.batch_execute("SELECT pgfeed.watch('orders', 'tenant')")
        .await
        .unwrap();
    let reset = loop {
        let e = s.next().await.expect("the stream stays open");
        match e.event.as_str() {
            "reset" => break e,
            "change" => panic!("a change before the reset: {e:?}"),
            _ => {}
        }
    };
    assert_eq!(reset.json()["position"], "0.0", "{reset:?}");
    c.batch_execute("INSERT INTO orders (tenant, body) VALUES ('acme', 'three')")
        .await
        .unwrap();
    let three = s.next_change().await;
    assert_eq!(three["new"]["body"], "three");
    assert_eq!(three["position"], "1.1", "positions of the new journal");
    support::until_readyz(gw.addr, 200).await;
    gw.stop().await;
}
