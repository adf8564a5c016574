//! Tenant isolation: many tenants and subscribers under a seeded random workload, forged
//! NOTIFYs from an unprivileged role, and application roles that hold no privilege on
//! schema `pgfeed`. Real writes, a real gateway, real HTTP.

use pgfeed_testkit as support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use support::workload::{self, Positions, Reader, Rng};
use support::{Gateway, TestDb};
use tokio_postgres::error::SqlState;

/// Every tenant that writes. The first `SUBSCRIBED` have subscribers; the others write
/// rows that nobody may see. Names that differ only by case or a suffix, digits, non-ASCII
/// and a quote, so that no loose comparison can pass.
const TENANTS: [&str; 11] = [
    "acme", "ACME", "acme2", "globex", "42", "initech", "umbrella", "émile", "o'hara", "hooli",
    "nobody",
];
const SUBSCRIBED: usize = 9;

/// Watched tables: two tenant tables and one public table.
const TABLES: [&str; 3] = ["public.notes", "public.tasks", "public.announcements"];
const PUBLIC_TABLE: usize = 2;

fn sql_name(table: usize) -> &'static str {
    TABLES[table].strip_prefix("public.").unwrap()
}

/// A secret that only tenant `t` may ever see: `<S3>` cannot occur inside `<S13>`.
fn tag(t: usize) -> String {
    format!("<S{t}>")
}

/// The model of a row.
#[derive(Clone, Debug)]
struct Row {
    tenant: Option<usize>,
    body: String,
    secret: Option<String>,
}

impl Row {
    fn json(&self, id: i32) -> Value {
        match self.tenant {
            Some(t) => {
                json!({"id": id, "tenant": TENANTS[t], "body": self.body, "secret": self.secret})
            }
            None => json!({"id": id, "body": self.body}),
        }
    }
}

/// A change the database must capture, as the event's data shows it (without position
/// and commit time).
#[derive(Clone, Debug)]
struct Expected {
    table: usize,
    op: &'static str,
    tenant: Option<usize>,
    data: Value,
}

fn expected(
    table: usize,
    op: &'static str,
    tenant: Option<usize>,
    id: i32,
    new: Option<&Row>,
    old: Option<&Row>,
) -> Expected {
    let mut data = json!({"table": TABLES[table], "op": op, "pk": {"id": id}});
    if let Some(t) = tenant {
        data["tenant"] = json!(TENANTS[t]);
    }
    if let Some(new) = new {
        data["new"] = new.json(id);
    }
    if let Some(old) = old {
        data["old"] = old.json(id);
    }
    if let (Some(new), Some(old)) = (new, old) {
        // Columns an update changed, sorted by name.
        let mut changed = Vec::new();
        if new.body != old.body {
            changed.push("body");
        }
        if new.secret != old.secret {
            changed.push("secret");
        }
        if new.tenant != old.tenant {
            changed.push("tenant");
        }
        changed.sort_unstable();
        data["changed"] = json!(changed);
    }
    Expected {
        table,
        op,
        tenant,
        data,
    }
}

/// One subscriber and what it asked for.
struct Sub {
    tenant: usize,
    query: String,
    tables: Option<Vec<usize>>,
    ops: Option<Vec<&'static str>>,
}

impl Sub {
    /// What the contract says this subscriber receives.
    fn wants(&self, e: &Expected) -> bool {
        let visible = e.table == PUBLIC_TABLE || e.tenant == Some(self.tenant);
        visible
            && self.tables.as_ref().is_none_or(|t| t.contains(&e.table))
            && self.ops.as_ref().is_none_or(|o| o.contains(&e.op))
    }
}

/// A subscription: its query, and the tables and ops it selects (`None`: all).
type Subscription = (String, Option<Vec<usize>>, Option<Vec<&'static str>>);

/// The three subscriptions of tenant `i`: everything, a `tables=` selection (bare and
/// qualified names), and an `ops=` selection.
fn subscriptions(i: usize) -> [Subscription; 3] {
    let by_table = match i % 3 {
        0 => ("tables=notes".to_string(), Some(vec![0]), None),
        1 => (
            "tables=public.tasks,announcements".to_string(),
            Some(vec![1, 2]),
            None,
        ),
        _ => (
            "tables=notes,public.announcements".to_string(),
            Some(vec![0, 2]),
            None,
        ),
    };
    let by_op = match i % 3 {
        0 => ("ops=insert".to_string(), None, Some(vec!["insert"])),
        1 => (
            "ops=update,delete".to_string(),
            None,
            Some(vec!["update", "delete"]),
        ),
        _ => (
            "tables=tasks&ops=delete,insert".to_string(),
            Some(vec![1]),
            Some(vec!["delete", "insert"]),
        ),
    };
    [(String::new(), None, None), by_table, by_op]
}

#[tokio::test]
async fn random_workload_reaches_exactly_the_right_subscribers() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    support::tenant_table(&db, "tasks").await;
    let mut c = db.client().await;
    c.batch_execute(
        "CREATE TABLE announcements (id serial PRIMARY KEY, body text);
         SELECT pgfeed.watch('announcements', public => true);",
    )
    .await
    .unwrap();
    let gw = Gateway::start(&db).await;

    let mut subs = Vec::new();
    let mut readers = Vec::new();
    for (tenant, name) in TENANTS.iter().enumerate().take(SUBSCRIBED) {
        for (query, tables, ops) in subscriptions(tenant) {
            let mut stream = gw.stream(name, &query).await;
            assert_eq!(stream.status, 200, "{name} {query}");
            assert!(
                stream.until_live().await.is_empty(),
                "nothing to replay on a fresh stream"
            );
            readers.push(Reader::spawn(stream));
            subs.push(Sub {
                tenant,
                query,
                tables,
                ops,
            });
        }
    }

    // The workload: committed transactions of random statements, each touching one row, so
    // that the order of changes is the order of statements. Two transactions roll back.
    let mut rng = Rng::seeded(0x9e37_79b9_7f4a_7c15);
    let mut rows: BTreeMap<(usize, i32), Row> = BTreeMap::new();
    let mut all: Vec<Expected> = Vec::new();
    let mut step = 0usize;
    for tx_no in 0..22 {
        let rollback = tx_no == 6 || tx_no == 15;
        let saved = rows.clone();
        let mut pending = Vec::new();
        let tx = c.transaction().await.unwrap();
        for _ in 0..(5 + rng.below(31)) {
            step += 1;
            let table = match rng.below(10) {
                0..=3 => 0,
                4..=7 => 1,
                _ => PUBLIC_TABLE,
            };
            let name = sql_name(table);
            let existing: Vec<i32> = rows
                .keys()
                .filter(|(t, _)| *t == table)
                .map(|(_, id)| *id)
                .collect();
            let roll = rng.below(100);
            if existing.is_empty() || roll < 40 {
                // Insert.
                let row = if table == PUBLIC_TABLE {
                    Row {
                        tenant: None,
                        body: format!("pub{step}"),
                        secret: None,
                    }
                } else {
                    let t = rng.below(TENANTS.len());
                    Row {
                        tenant: Some(t),
                        body: format!("b{step}"),
                        secret: Some(format!("{}#{step}", tag(t))),
                    }
                };
                let id: i32 = match row.tenant {
                    Some(t) => tx
                        .query_one(
                            &format!("INSERT INTO {name} (tenant, body, secret) VALUES ($1, $2, $3) RETURNING id"),
                            &[&TENANTS[t], &row.body, &row.secret],
                        )
                        .await
                        .unwrap()
                        .get(0),
                    None => tx
                        .query_one(&format!("INSERT INTO {name} (body) VALUES ($1) RETURNING id"), &[&row.body])
                        .await
                        .unwrap()
                        .get(0),
                };
                pending.push(expected(table, "insert", row.tenant, id, Some(&row), None));
                rows.insert((table, id), row);
                continue;
            }
            let id = existing[rng.below(existing.len())];
            let old = rows[&(table, id)].clone();
            if roll < 75 {
                // Update the body, sometimes the secret too, in place.
                let mut new = old.clone();
                new.body = format!("b{step}");
                if let Some(t) = old.tenant.filter(|_| rng.chance(40)) {
                    new.secret = Some(format!("{}#{step}", tag(t)));
                    tx.execute(
                        &format!("UPDATE {name} SET body = $1, secret = $2 WHERE id = $3"),
                        &[&new.body, &new.secret, &id],
                    )
                    .await
                    .unwrap();
                } else {
                    tx.execute(
                        &format!("UPDATE {name} SET body = $1 WHERE id = $2"),
                        &[&new.body, &id],
                    )
                    .await
                    .unwrap();
                }
                pending.push(expected(
                    table,
                    "update",
                    old.tenant,
                    id,
                    Some(&new),
                    Some(&old),
                ));
                rows.insert((table, id), new);
            } else if roll < 82 && old.tenant.is_some() {
                // Move the row to another tenant: the old one sees it leave, the new one
                // sees it arrive (with a secret of its own), and neither sees the other's.
                let from = old.tenant.unwrap();
                let to = (from + 1 + rng.below(TENANTS.len() - 1)) % TENANTS.len();
                let new = Row {
                    tenant: Some(to),
                    body: format!("b{step}"),
                    secret: Some(format!("{}#{step}", tag(to))),
                };
                tx.execute(
                    &format!("UPDATE {name} SET tenant = $1, body = $2, secret = $3 WHERE id = $4"),
                    &[&TENANTS[to], &new.body, &new.secret, &id],
                )
                .await
                .unwrap();
                pending.push(expected(table, "delete", Some(from), id, None, Some(&old)));
                pending.push(expected(table, "insert", Some(to), id, Some(&new), None));
                rows.insert((table, id), new);
            } else {
                tx.execute(&format!("DELETE FROM {name} WHERE id = $1"), &[&id])
                    .await
                    .unwrap();
                pending.push(expected(table, "delete", old.tenant, id, None, Some(&old)));
                rows.remove(&(table, id));
            }
        }
        if rollback {
            tx.rollback().await.unwrap();
            rows = saved;
        } else {
            tx.commit().await.unwrap();
            all.extend(pending);
        }
    }
    assert!(
        all.len() >= 300,
        "the workload is a few hundred changes: {}",
        all.len()
    );
    workload::assert_journal_holds(&c, all.len(), "").await;

    // What each subscriber must receive, as indexes into `all`.
    let wanted = workload::wanted(&subs, &all, Sub::wants);

    // Every stream, read all along, has its count, then nothing follows.
    let counts: Vec<usize> = wanted.iter().map(Vec::len).collect();
    let received = workload::collect(&mut readers, &counts, Duration::from_millis(500)).await;

    let mut positions = Positions::default();
    for (((s, w), got), reader) in subs.iter().zip(&wanted).zip(&received).zip(readers) {
        let who = format!("{} ?{}", TENANTS[s.tenant], s.query);
        assert!(
            !w.is_empty(),
            "{who}: the workload gives every subscriber something"
        );
        let expect: Vec<Value> = w.iter().map(|&i| all[i].data.clone()).collect();
        let got = workload::check_stream(&who, got, &expect);
        for (&i, event) in w.iter().zip(&got) {
            positions.record(&who, i, event);
        }
        // No row of another tenant reached this stream, not even inside some field.
        let stream = reader.finish().await;
        for other in (0..TENANTS.len()).filter(|&t| t != s.tenant) {
            assert!(
                !stream.raw.contains(&tag(other)),
                "{who} received a row of tenant {:?}",
                TENANTS[other]
            );
        }
    }
    // Every change was seen by someone (each tenant table change of a subscribed tenant,
    // every public one), and positions follow the workload's order.
    let seen = positions.assert_in_order("");
    let visible = all
        .iter()
        .filter(|e| e.table == PUBLIC_TABLE || e.tenant.is_some_and(|t| t < SUBSCRIBED))
        .count();
    assert_eq!(seen, visible);
    gw.stop().await;
}

/// Creates login role `{db}_{what}` with no privileges beyond PUBLIC's (NOINHERIT);
/// returns its name.
async fn create_role(db: &TestDb, what: &str) -> String {
    support::create_login_role_with(db, what, "NOINHERIT").await
}

/// Connects to the test database as `role` and checks that the session runs as it.
async fn connect_as(db: &TestDb, role: &str) -> tokio_postgres::Client {
    let client = support::connect_as_role(db, role).await;
    let me: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(me, role);
    client
}

/// A role `what` that owns schema `app` (as an application running its own migrations
/// would), an admin client, and a client connected as that role.
async fn schema_owner(
    db: &TestDb,
    what: &str,
) -> (String, tokio_postgres::Client, tokio_postgres::Client) {
    let owner = create_role(db, what).await;
    let admin = db.client().await;
    admin
        .batch_execute(&format!("CREATE SCHEMA app AUTHORIZATION {owner}"))
        .await
        .unwrap();
    let o = connect_as(db, &owner).await;
    (owner, admin, o)
}

/// Journal rows of the table the forging casts below pretend to capture.
async fn forged_rows(admin: &tokio_postgres::Client) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pgfeed.changes WHERE table_name = 'public.payroll'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// A REPEATABLE READ transaction that has taken its snapshot.
async fn repeatable_read_snapshot(
    client: &mut tokio_postgres::Client,
) -> tokio_postgres::Transaction<'_> {
    let tx = support::repeatable_read(client).await;
    tx.batch_execute("SELECT 1").await.unwrap();
    tx
}

/// Best-effort removal of a role created by a test (matters only on a shared server).
async fn drop_role(db: &TestDb, role: &str) {
    let c = db.client().await;
    let _ = c
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await;
}

#[tokio::test]
async fn forged_notify_from_another_role_delivers_nothing() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let gw = Gateway::start(&db).await;
    let mut streams = Vec::new();
    for (tenant, query) in [
        ("acme", ""),
        ("globex", ""),
        ("acme", "tables=notes&ops=insert"),
    ] {
        let mut s = gw.stream(tenant, query).await;
        s.until_live().await;
        streams.push(s);
    }

    let intruder = create_role(&db, "intruder").await;
    let evil = connect_as(&db, &intruder).await;
    // It cannot write the table, let alone the journal ...
    let denied = evil
        .batch_execute("INSERT INTO notes (tenant, body) VALUES ('acme', 'forged')")
        .await
        .unwrap_err();
    assert_eq!(
        denied.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{denied}"
    );
    // ... but anyone may NOTIFY. Each in its own transaction, so none is folded into another.
    let imitation = json!({
        "position": "999.1", "table": "public.notes", "op": "insert", "tenant": "acme",
        "pk": {"id": 1}, "new": {"id": 1, "tenant": "acme", "body": "forged"},
        "committed_at": "2026-11-23T14:03:01.123456Z"
    })
    .to_string()
    .replace('\'', "''");
    for payload in [
        "999:1".to_string(),
        "garbage".to_string(),
        imitation,
        "9223372036854775807:1".to_string(),
        "1:1".to_string(),
        String::new(),
    ] {
        evil.batch_execute(&format!("NOTIFY pgfeed, '{payload}'"))
            .await
            .unwrap();
    }
    evil.query_one("SELECT pg_notify('pgfeed', '5:100')", &[])
        .await
        .unwrap();
    for s in &mut streams {
        s.assert_quiet(Duration::from_millis(300)).await;
    }

    // A real change, committed after every forged ring: it is the very next event of each
    // stream that may see it (so the forged rings produced nothing before it), and nothing
    // the forger wrote ever reaches a stream.
    let c = db.client().await;
    c.batch_execute("INSERT INTO notes (tenant, body) VALUES ('acme', 'real')")
        .await
        .unwrap();
    for (i, s) in streams.iter_mut().enumerate() {
        if i == 1 {
            continue;
        }
        let e = s.next().await.expect("stream still open");
        assert_eq!(e.event, "change", "{e:?}");
        let data = e.json();
        assert_eq!(data["new"]["body"], "real");
        assert_eq!(data["tenant"], "acme");
    }
    c.batch_execute("INSERT INTO notes (tenant, body) VALUES ('globex', 'real globex')")
        .await
        .unwrap();
    let e = streams[1].next().await.expect("stream still open");
    assert_eq!(e.event, "change", "{e:?}");
    assert_eq!(e.json()["new"]["body"], "real globex");
    for s in &mut streams {
        s.assert_quiet(Duration::from_millis(200)).await;
        assert!(
            !s.raw.contains("forged") && !s.raw.contains("999."),
            "{}",
            s.raw
        );
    }
    drop(evil);
    gw.stop().await;
    drop_role(&db, &intruder).await;
}

#[tokio::test]
async fn application_roles_need_no_privilege_on_schema_pgfeed() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let app = create_role(&db, "app").await;
    db.client()
        .await
        .batch_execute(&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO {app};
             GRANT USAGE ON SEQUENCE notes_id_seq TO {app};"
        ))
        .await
        .unwrap();
    let gw = Gateway::start(&db).await;
    let mut s = gw.stream("acme", "").await;
    s.until_live().await;

    let a = connect_as(&db, &app).await;
    let has_usage: bool = a
        .query_one("SELECT has_schema_privilege('pgfeed', 'USAGE')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!has_usage, "the role has no privilege on schema pgfeed");

    // Its ordinary writes are captured and delivered.
    let id: i32 = a
        .query_one(
            "INSERT INTO notes (tenant, body) VALUES ('acme', 'by app') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let ins = s.next_change().await;
    assert_eq!(
        (ins["op"].as_str(), ins["pk"]["id"].as_i64()),
        (Some("insert"), Some(id as i64))
    );
    assert_eq!(ins["new"]["body"], "by app");
    a.execute(
        "UPDATE notes SET body = 'edited by app' WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    let upd = s.next_change().await;
    assert_eq!(upd["op"], "update");
    assert_eq!(upd["old"]["body"], "by app");
    assert_eq!(upd["new"]["body"], "edited by app");
    // Several statements in one transaction of the role's own.
    a.batch_execute(
        "BEGIN;
         INSERT INTO notes (tenant, body) VALUES ('acme', 'second');
         DELETE FROM notes WHERE body = 'edited by app';
         COMMIT;",
    )
    .await
    .unwrap();
    let second = s.next_change().await;
    assert_eq!(
        (second["op"].as_str(), second["new"]["body"].as_str()),
        (Some("insert"), Some("second"))
    );
    let del = s.next_change().await;
    assert_eq!(del["op"], "delete");
    assert_eq!(del["pk"]["id"], id);

    // It can neither forge journal rows, nor read them, nor change what is captured.
    for sql in [
        "INSERT INTO pgfeed.changes (xid, ord, table_name, op, tenant, public, new) \
         VALUES (pg_current_xact_id(), 1, 'public.notes', 'insert', 'acme', false, '{\"body\":\"forged\"}')",
        "SELECT * FROM pgfeed.changes",
        "SELECT pgfeed.watch('notes', 'tenant')",
        "SELECT pgfeed.watch('notes', public => true)",
        "SELECT pgfeed.unwatch('notes')",
        "INSERT INTO pgfeed.commits (seq, xid, n, committed_at) VALUES (999, pg_current_xact_id(), 1, now())",
        "SELECT * FROM pgfeed.json_casts_since_initdb",
        "SELECT pgfeed._check_casts('notes'::regclass)",
        "SELECT nextval('pgfeed.commit_seq')",
    ] {
        let err = a.batch_execute(sql).await.expect_err(sql);
        assert_eq!(
            err.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err}"
        );
    }
    s.assert_quiet(Duration::from_millis(300)).await;
    assert!(!s.raw.contains("forged"));

    // Capture still works for it afterwards, and the journal holds exactly the real changes.
    a.batch_execute("INSERT INTO notes (tenant, body) VALUES ('acme', 'still captured')")
        .await
        .unwrap();
    assert_eq!(s.next_change().await["new"]["body"], "still captured");
    let c = db.client().await;
    assert_eq!(support::journal_len(&c).await, 5);
    drop(a);
    gw.stop().await;
    drop_role(&db, &app).await;
}

#[tokio::test]
async fn a_table_owner_cannot_forge_journal_rows_through_the_capture_trigger() {
    // The application role owns its schema, types and tables (it runs its own
    // migrations), and holds nothing on schema pgfeed. The operator watches its tables.
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let (owner, admin, o) = schema_owner(&db, "owner").await;
    // Its type reaches the row directly, in an array, through a domain and inside a
    // composite: to_jsonb() looks for a cast to json at every level.
    let variants = [
        ("direct", "app.mood", "'calm'::app.mood"),
        ("array", "app.mood[]", "ARRAY['calm']::app.mood[]"),
        ("domain", "app.mood_d", "'calm'::app.mood_d"),
        ("composite", "app.pair", "ROW('calm')::app.pair"),
    ];
    o.batch_execute(
        "CREATE TYPE app.mood AS ENUM ('calm');
         CREATE DOMAIN app.mood_d AS app.mood;
         CREATE TYPE app.pair AS (m app.mood);
         CREATE TABLE app.seen (who text);",
    )
    .await
    .unwrap();
    for (name, column_type, value) in variants {
        o.batch_execute(&format!(
            "CREATE TABLE app.{name} (id int PRIMARY KEY, tenant text NOT NULL, v {column_type});
             INSERT INTO app.{name} VALUES (1, 'acme', {value}), (2, 'acme', {value});"
        ))
        .await
        .unwrap();
        admin
            .batch_execute(&format!("SELECT pgfeed.watch('app.{name}', 'tenant')"))
            .await
            .unwrap();
    }
    let gw = Gateway::start(&db).await;
    let mut acme = gw.stream("acme", "").await;
    let mut globex = gw.stream("globex", "").await;
    acme.until_live().await;
    globex.until_live().await;
    o.batch_execute("INSERT INTO app.direct VALUES (3, 'acme', 'calm')")
        .await
        .unwrap();
    assert_eq!(acme.next_change().await["table"], "app.direct", "watched");
    let denied = o
        .batch_execute("SELECT count(*) FROM pgfeed.changes")
        .await
        .unwrap_err();
    assert_eq!(
        denied.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{denied}"
    );

    // Now the owner gives its type a cast to json: to_jsonb() calls such a cast when it
    // renders a row, and the capture trigger renders rows.
    o.batch_execute(
        r#"CREATE FUNCTION app.mood_json(m app.mood) RETURNS json LANGUAGE plpgsql AS $$
           BEGIN
               INSERT INTO app.seen VALUES (current_user);
               INSERT INTO pgfeed.changes (xid, ord, table_name, op, tenant, public, pk, new)
               VALUES (pg_current_xact_id(), 1000, 'public.payroll', 'insert', 'globex', false,
                       '{"id": 1}', '{"id": 1, "body": "forged by the owner of app tables"}')
               ON CONFLICT DO NOTHING;
               RETURN to_json(m::text);
           END $$;
           CREATE CAST (app.mood AS json) WITH FUNCTION app.mood_json(app.mood);"#,
    )
    .await
    .unwrap();
    // Whether each write is refused or captured, it must not forge anything.
    let mut outcomes = Vec::new();
    for (name, _, value) in variants {
        for sql in [
            format!("INSERT INTO app.{name} VALUES (10, 'acme', {value})"),
            format!("UPDATE app.{name} SET tenant = 'acme' || '' WHERE id = 1"),
            format!("UPDATE app.{name} SET id = 20 WHERE id = 1"),
            format!("DELETE FROM app.{name} WHERE id = 2"),
        ] {
            let outcome = o.batch_execute(&sql).await;
            outcomes.push(format!("{sql}: {:?}", outcome.map_err(|e| e.to_string())));
        }
    }
    let seen: Vec<String> = admin
        .query("SELECT who FROM app.seen", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    // A real globex change after them: it must be globex's very next event.
    admin
        .batch_execute("INSERT INTO notes (tenant, body) VALUES ('globex', 'real')")
        .await
        .unwrap();
    let e = globex.next().await.expect("stream open");
    assert_eq!(
        e.json()["new"]["body"],
        "real",
        "globex received a journal row forged by the owner of the app tables (the cast ran \
         as {seen:?}; writes: {outcomes:#?}): {e:?}"
    );
    let forged = forged_rows(&admin).await;
    assert_eq!(forged, 0, "forged journal rows (the cast ran as {seen:?})");
    // The root cause: code the table owner controls must never run with the privileges of
    // the capture functions' owner (here a superuser).
    assert!(
        seen.iter().all(|who| *who == owner),
        "the owner's cast ran as {seen:?}"
    );
    // Nor did acme, whatever of its own writes was captured: read up to a real change.
    admin
        .batch_execute("INSERT INTO notes (tenant, body) VALUES ('acme', 'real')")
        .await
        .unwrap();
    loop {
        let change = acme.next_change().await;
        assert_ne!(change["table"], "public.payroll", "{change}");
        if change["table"] == "public.notes" {
            assert_eq!(change["new"]["body"], "real");
            break;
        }
    }
    drop(o);
    gw.stop().await;
    drop_role(&db, &owner).await;
}

#[tokio::test]
async fn a_cast_created_after_a_repeatable_read_snapshot_runs_in_a_sandbox() {
    // The cast check reads pg_cast through the transaction's snapshot, but to_jsonb()
    // finds casts through the catalog cache, which sees every committed cast. A
    // REPEATABLE READ transaction whose snapshot predates the cast therefore passes the
    // check and runs the cast while capture renders its row. Capture renders in a
    // read-only subtransaction that it always rolls back: while read-only, what the cast
    // tries as the capture role is refused; what it may still do (write a temporary
    // table, queue a deferred trigger) and what it writes after resetting the read-only
    // setting are undone.
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let (owner, admin, o) = schema_owner(&db, "rr_owner").await;
    o.batch_execute(
        "CREATE TYPE app.mood AS ENUM ('calm');
         CREATE TYPE app.tone AS ENUM ('flat');
         CREATE TABLE app.direct (id int PRIMARY KEY, tenant text NOT NULL, v app.mood);
         CREATE TABLE app.other (id int PRIMARY KEY, tenant text NOT NULL, v app.tone);
         CREATE TABLE app.seen (who text);
         GRANT INSERT ON app.seen TO PUBLIC;
         CREATE FUNCTION app.fired() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO app.seen VALUES (current_user);
             RETURN NULL;
         END $$;",
    )
    .await
    .unwrap();
    for table in ["app.direct", "app.other"] {
        admin
            .batch_execute(&format!("SELECT pgfeed.watch('{table}', 'tenant')"))
            .await
            .unwrap();
    }
    let gw = Gateway::start(&db).await;
    let mut acme = gw.stream("acme", "").await;
    let mut globex = gw.stream("globex", "").await;
    acme.until_live().await;
    globex.until_live().await;

    let mut writer = connect_as(&db, &owner).await;
    // A temporary table with a deferred trigger, writable by the capture role: the one
    // kind of write a read-only transaction still allows.
    writer
        .batch_execute(
            "CREATE TEMP TABLE scratch (who text);
             GRANT ALL ON scratch TO PUBLIC;
             CREATE CONSTRAINT TRIGGER fired AFTER INSERT ON scratch
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION app.fired();",
        )
        .await
        .unwrap();
    // The cast created next is invisible to this transaction's snapshot.
    let tx = repeatable_read_snapshot(&mut writer).await;
    // The cast tries each escalation and reports, as the value it renders, what happened.
    o.batch_execute(
        r#"CREATE FUNCTION app.mood_json(m app.mood) RETURNS json LANGUAGE plpgsql AS $$
           DECLARE
               report jsonb := '{}';
               attempts text[] := ARRAY[
                   'journal', $a$INSERT INTO pgfeed.changes (xid, ord, table_name, op, tenant, public, pk, new)
                       VALUES (pg_current_xact_id(), 1000, 'public.payroll', 'insert', 'globex', false,
                               '{"id": 1}', '{"id": 1, "body": "forged under repeatable read"}')$a$,
                   'alter', 'ALTER FUNCTION pgfeed._capture_insert() SECURITY INVOKER',
                   'grant', format('GRANT INSERT ON pgfeed.changes TO %I', session_user),
                   'function', 'CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql SECURITY DEFINER AS ''SELECT 1''',
                   'sequence', 'SELECT nextval(''pgfeed.commit_seq'')',
                   'scratch', 'INSERT INTO pg_temp.scratch VALUES (current_user)'];
           BEGIN
               FOR i IN 1 .. array_length(attempts, 1) BY 2 LOOP
                   BEGIN
                       EXECUTE attempts[i + 1];
                       report := report || jsonb_build_object(attempts[i], 'done');
                   EXCEPTION WHEN OTHERS THEN
                       report := report || jsonb_build_object(attempts[i], SQLERRM);
                   END;
               END LOOP;
               -- PostgreSQL checks SET transaction_read_only, not RESET: past this line
               -- only the sandbox's rollback stands between these writes and the journal.
               RESET transaction_read_only;
               report := report || jsonb_build_object('read_only_after_reset',
                                                      current_setting('transaction_read_only'));
               FOR i IN 1 .. 7 BY 2 LOOP
                   BEGIN
                       EXECUTE replace(attempts[i + 1], 'pg_temp.f()', 'pg_temp.g()');
                       report := report || jsonb_build_object('reset_' || attempts[i], 'done');
                   EXCEPTION WHEN OTHERS THEN
                       report := report || jsonb_build_object('reset_' || attempts[i], SQLERRM);
                   END;
               END LOOP;
               RETURN report::json;
           END $$;
           CREATE CAST (app.mood AS json) WITH FUNCTION app.mood_json(app.mood);"#,
    )
    .await
    .unwrap();
    tx.batch_execute("INSERT INTO app.direct VALUES (1, 'acme', 'calm')")
        .await
        .expect("capture renders the row in its sandbox");
    tx.commit().await.unwrap();

    // The row was captured, rendered through the cast: its value is the cast's report.
    let change = acme.next_change().await;
    assert_eq!(change["table"], "app.direct", "{change}");
    let report = &change["new"]["v"];
    for attempt in ["journal", "alter", "grant", "function", "sequence"] {
        let outcome = report[attempt].as_str().unwrap_or_default();
        assert!(
            outcome.contains("read-only transaction"),
            "{attempt} was not refused as a write: {report}"
        );
    }
    assert_eq!(report["scratch"], "done", "{report}");
    // Then the cast reset the read-only setting and wrote: the journal row, the altered
    // function, the temporary function (its outcomes are reported, not required; what
    // counts is below: none of it outlived the rendering).
    assert!(report.get("reset_journal").is_some(), "{report}");
    // Nothing of it outlived the rendering.
    let scratch: i64 = writer
        .query_one("SELECT count(*) FROM pg_temp.scratch", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(scratch, 0, "the cast's write to a temporary table was kept");
    let temp_functions: i64 = writer
        .query_one(
            "SELECT count(*) FROM pg_proc WHERE pronamespace = pg_my_temp_schema()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        temp_functions, 0,
        "a temporary function the cast created was kept"
    );
    let fired: i64 = admin
        .query_one("SELECT count(*) FROM app.seen", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        fired, 0,
        "a deferred trigger the cast queued fired at commit"
    );
    let row = admin
        .query_one(
            "SELECT (SELECT prosecdef FROM pg_proc
                      WHERE oid = 'pgfeed._capture_insert()'::regprocedure),
                    has_table_privilege($1, 'pgfeed.changes', 'INSERT'),
                    (SELECT last_value FROM pgfeed.commit_seq)
                        = (SELECT count(*) FROM pgfeed.commits)",
            &[&owner],
        )
        .await
        .unwrap();
    let (definer, can_insert, no_gap): (bool, bool, bool) = (row.get(0), row.get(1), row.get(2));
    assert!(definer, "the capture function was altered");
    assert!(!can_insert, "the owner was granted INSERT on the journal");
    assert!(no_gap, "the commit sequence has a number no commit used");
    assert_eq!(forged_rows(&admin).await, 0, "forged journal rows");

    // A cast that raises the sandbox's own SQLSTATE cannot pass for a finished rendering.
    let tx = repeatable_read_snapshot(&mut writer).await;
    o.batch_execute(
        "CREATE FUNCTION app.tone_json(t app.tone) RETURNS json LANGUAGE plpgsql AS $$
         BEGIN
             RAISE SQLSTATE 'PGFR0';
         END $$;
         CREATE CAST (app.tone AS json) WITH FUNCTION app.tone_json(app.tone);",
    )
    .await
    .unwrap();
    let err = tx
        .batch_execute("INSERT INTO app.other VALUES (1, 'acme', 'flat')")
        .await
        .expect_err("an interrupted rendering fails the statement");
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
    let message = err.as_db_error().map(|e| e.message()).unwrap_or_default();
    assert!(
        message.contains("rendering its rows was interrupted"),
        "{err:?}"
    );
    drop(tx);

    // globex saw nothing but its own real change.
    admin
        .batch_execute("INSERT INTO notes (tenant, body) VALUES ('globex', 'real')")
        .await
        .unwrap();
    let e = globex.next_change().await;
    assert_eq!(e["new"]["body"], "real", "{e}");
    drop(o);
    drop(writer);
    gw.stop().await;
    drop_role(&db, &owner).await;
}
