//! The group notification example (`examples/group-notify`), run as its README says: its
//! two SQL files through `psql`, against a gateway, with one subscriber per tenant. (The
//! JavaScript examples are exercised in a real browser by `tests/browser.rs`.)

use pgfeed_testkit as support;

use std::collections::BTreeSet;
use std::process::Command;

use support::{Gateway, SseClient, TestDb};

fn psql_file(db: &TestDb, file: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/group-notify/").to_string() + file;
    let out = Command::new("psql")
        .args([&db.url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", &path])
        .output()
        .unwrap_or_else(|e| {
            panic!("running psql (install it: Debian `apt-get install postgresql-client`): {e}")
        });
    assert!(
        out.status.success(),
        "psql -f {file} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The employee ids a tenant's subscriber should hear about.
async fn ops_team(db: &TestDb, tenant: &str) -> BTreeSet<i64> {
    db.client()
        .await
        .query(
            "SELECT id::int8 FROM employees WHERE tenant = $1 AND team = 'ops'",
            &[&tenant],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Reads `n` changes, skipping the `live` control event.
async fn changes(stream: &mut SseClient, n: usize) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(stream.next_change().await);
    }
    out
}

#[tokio::test]
async fn one_statement_notifies_each_tenant_of_its_own_employees() {
    let db = TestDb::new().await;
    psql_file(&db, "setup.sql");
    let gw = Gateway::start(&db).await;
    let tenants = ["acme", "globex", "initech"];
    let mut streams = Vec::new();
    for tenant in tenants {
        let mut s = gw.stream(tenant, "tables=notifications").await;
        assert_eq!(s.status, 200, "{tenant}");
        let live = s.next().await.expect("live");
        assert_eq!(live.event, "live");
        streams.push(s);
    }
    // The README's per-employee narrowing: Dana's page, with a row filter.
    let dana: i64 = db
        .client()
        .await
        .query_one("SELECT id::int8 FROM employees WHERE name = 'Dana'", &[])
        .await
        .unwrap()
        .get(0);
    let mut dana_stream = gw
        .stream(
            "globex",
            &format!("tables=notifications&filter=notifications:employee_id=eq.{dana}"),
        )
        .await;
    assert_eq!(dana_stream.status, 200);
    assert_eq!(dana_stream.next().await.expect("live").event, "live");

    psql_file(&db, "notify.sql");
    // A second commit afterwards, one row per tenant: each stream's next event after its
    // notifications must be this one, so nothing else (another tenant's row) came between.
    db.client()
        .await
        .batch_execute(
            "INSERT INTO notifications (tenant, employee_id, message)
             SELECT DISTINCT ON (tenant) tenant, id, 'sentinel' FROM employees ORDER BY tenant, id",
        )
        .await
        .unwrap();

    let mut commit = None;
    for (tenant, stream) in tenants.iter().zip(streams.iter_mut()) {
        let expected = ops_team(&db, tenant).await;
        assert!(
            !expected.is_empty(),
            "the example seeds ops staff for {tenant}"
        );
        let got = changes(stream, expected.len()).await;
        let mut ids = BTreeSet::new();
        for c in &got {
            assert_eq!(c["op"], "insert");
            assert_eq!(c["table"], "public.notifications");
            assert_eq!(c["tenant"], *tenant);
            assert_eq!(c["new"]["tenant"], *tenant);
            assert_eq!(
                c["new"]["message"],
                "The on-call rota for next week is published"
            );
            ids.insert(c["new"]["employee_id"].as_i64().unwrap());
            // All of them from the one statement's single commit.
            let this = c["position"]
                .as_str()
                .unwrap()
                .split('.')
                .next()
                .map(str::to_string);
            match &commit {
                None => commit = this,
                Some(c0) => assert_eq!(Some(c0), this.as_ref(), "one commit for the whole group"),
            }
        }
        assert_eq!(ids, expected, "{tenant} receives exactly its ops team");
        let next = stream.next_change().await;
        assert_eq!(
            next["new"]["message"], "sentinel",
            "{tenant}: nothing else came between"
        );
        assert_eq!(next["tenant"], *tenant);
    }
    let only = dana_stream.next_change().await;
    assert_eq!(only["new"]["employee_id"].as_i64(), Some(dana));
    assert_eq!(
        only["new"]["message"],
        "The on-call rota for next week is published"
    );
    // Emeka's and Farah's rows came between, and the filter left them out: next is the
    // sentinel, which went to globex's first employee, Dana.
    let next = dana_stream.next_change().await;
    assert_eq!(next["new"]["message"], "sentinel");
    assert_eq!(next["new"]["employee_id"].as_i64(), Some(dana));
    gw.stop().await;
}
