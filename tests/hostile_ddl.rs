//! Issue 15 review, as the attacker and as the careless user: an application role that
//! owns the database and its tables (not a superuser) runs DDL that pgfeed's installer and
//! event triggers must survive. A schema `pgfeed` planted before the first install,
//! tables created inside `CREATE SCHEMA`, `TRUNCATE` of a partitioned table, DDL on other
//! tables while a watched partition is locked, `pgfeed install` re-run under an open
//! application transaction, triggers switched to replica-only, and an upgrade from schema 3
//! over a column renamed while schema 3 did not follow renames.

use pgfeed_testkit as support;

use std::time::Duration;

use support::{Gateway, Run, SseClient, TestDb, op_table_v, query_i64, server_message};

/// What a watched table's writes and DDL run as, and the operator (a superuser).
struct Setup {
    db: TestDb,
    /// A connection as the application role, which owns the database and its tables.
    app: tokio_postgres::Client,
    /// A connection as the superuser that installed pgfeed and runs `watch`.
    admin: tokio_postgres::Client,
}

/// A database with pgfeed installed, handed to an application role that has run
/// `app_sql`; the operator then runs `watch_sql`.
async fn setup(app_sql: &str, watch_sql: &str) -> Setup {
    let db = TestDb::new().await;
    let (_role, app) = support::app_owner(&db, "app").await;
    app.run(app_sql).await;
    let admin = db.client().await;
    admin.run(watch_sql).await;
    Setup { db, app, admin }
}

/// `measurements`, partitioned by tenant, with a partition per tenant in `tenants`, as
/// the application creates it.
fn measurements(tenants: &[&str]) -> String {
    let mut sql = String::from(
        "CREATE TABLE measurements (id int, tenant text NOT NULL, v text, PRIMARY KEY (tenant, id))
             PARTITION BY LIST (tenant);",
    );
    for t in tenants {
        sql.push_str(&format!(
            "CREATE TABLE measurements_{t} PARTITION OF measurements FOR VALUES IN ('{t}');"
        ));
    }
    sql
}

/// The operator's `watch` of `measurements` by its tenant column.
const WATCH_MEASUREMENTS: &str = "SELECT pgfeed.watch('measurements', tenant_column => 'tenant')";

/// Another login role of the application's, which may create tables in `public` (granted
/// by the application, its owner) and nothing else: it has nothing to do with the watched
/// tables. Returns a connection as it.
async fn other_role(setup: &Setup) -> tokio_postgres::Client {
    let other = support::create_login_role(&setup.db, "other").await;
    setup
        .app
        .run(&format!("GRANT CREATE ON SCHEMA public TO {other}"))
        .await;
    support::connect_as_role(&setup.db, &other).await
}

/// DDL on tables that have nothing to do with pgfeed, with a bounded wait for locks: it
/// must succeed whatever state the watched tables are in.
const UNRELATED_DDL: &[&str] = &[
    "SET lock_timeout = '2s'; CREATE TEMP TABLE tt (a int); DROP TABLE tt;",
    "SET lock_timeout = '2s'; CREATE TEMP TABLE tt (); DROP TABLE tt;",
    "SET lock_timeout = '2s'; CREATE TABLE x (); DROP TABLE x;",
    "SET lock_timeout = '2s';
     CREATE TABLE unrelated (a int); ALTER TABLE unrelated ADD COLUMN b int; DROP TABLE unrelated;",
];

/// Runs each of [`UNRELATED_DDL`] as `who`, each bounded by 10 s: each must succeed.
async fn unrelated_ddl_works(who: &tokio_postgres::Client) {
    for sql in UNRELATED_DDL {
        match tokio::time::timeout(Duration::from_secs(10), who.batch_execute(sql)).await {
            Err(_) => panic!("`{sql}` hung for 10 s"),
            Ok(Err(e)) => panic!("`{sql}` failed: {}", server_message(&e)),
            Ok(Ok(())) => {}
        }
    }
}

/// The [`op_table_v`] of each change of `s` up to the first whose `v` is `end`.
async fn summaries_until_end(s: &mut SseClient) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        got.push(op_table_v(&s.next_change().await));
        if got.last().unwrap().ends_with(" end") || got.len() > 20 {
            return got;
        }
    }
}

/// A superuser connection to `db` whose notices and warnings are collected.
async fn connect_collecting_notices(db: &TestDb) -> (tokio_postgres::Client, support::Notices) {
    let config: tokio_postgres::Config = db.url.parse().expect("the test URL parses");
    support::connect_collecting_notices(&config).await
}

/// Whether the pgfeed schema was left uninstalled: no journal, no event triggers.
async fn nothing_installed(admin: &tokio_postgres::Client) -> bool {
    query_i64(
        admin,
        "SELECT (to_regclass('pgfeed.changes') IS NOT NULL)::int
                + (to_regclass('pgfeed.watched') IS NOT NULL)::int
                + (SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'pgfeed%')",
        &[],
    )
    .await
        == 0
}

// ---------------------------------------------------------------------------------------
// A schema pgfeed planted by the application before the first install.

#[tokio::test]
async fn install_refuses_a_schema_pgfeed_that_the_application_created_first() {
    let db = TestDb::empty().await;
    let (role, app) = support::app_owner(&db, "app").await;
    // The database owner may create schemas: it takes pgfeed's name before the operator
    // installs.
    app.run("CREATE SCHEMA pgfeed").await;

    let out = support::pgfeed_cli(&db, &["install"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "`pgfeed install` into a schema owned by {role} must fail; stderr: {stderr}"
    );
    assert!(
        stderr.contains(&role),
        "the refusal must name the schema's owner {role}: {stderr}"
    );
    let admin = db.client().await;
    assert!(
        nothing_installed(&admin).await,
        "a refused install must leave nothing behind"
    );
}

#[tokio::test]
async fn install_runs_nothing_of_the_application_planted_in_schema_pgfeed() {
    let db = TestDb::empty().await;
    let (role, app) = support::app_owner(&db, "app").await;
    // The application's traps, in a schema pgfeed of its own made before the first install:
    // a trigger on the table install writes its version to, and a function of a name that
    // pgfeed's event triggers call (a superuser's CREATE OR REPLACE keeps its owner, who
    // could replace its body later). Each records who ran it.
    app.run(
        "CREATE TABLE public.trap_log (caller name, superuser boolean);
         CREATE FUNCTION public.trap() RETURNS trigger LANGUAGE plpgsql
         SET search_path = pg_catalog, pg_temp AS $$
         BEGIN
             INSERT INTO public.trap_log
             SELECT current_user, r.rolsuper FROM pg_roles AS r WHERE r.rolname = current_user;
             RETURN NEW;
         END $$;
         CREATE SCHEMA pgfeed;
         CREATE TABLE pgfeed.meta (
             singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
             version   integer NOT NULL
         );
         CREATE TRIGGER trap BEFORE INSERT OR UPDATE ON pgfeed.meta
             FOR EACH ROW EXECUTE FUNCTION public.trap();
         CREATE FUNCTION pgfeed._members(root regclass) RETURNS SETOF regclass
         LANGUAGE sql AS $$ SELECT root $$;",
    )
    .await;

    let mut installer = db.client().await;
    let outcome = tokio::time::timeout(support::SOON, pgfeed::schema::install(&mut installer))
        .await
        .expect("install finishes");
    let admin = db.client().await;
    let trapped = query_i64(
        &admin,
        "SELECT count(*) FROM public.trap_log WHERE superuser",
        &[],
    )
    .await;
    match outcome {
        Ok(done) => panic!(
            "install into a schema pgfeed owned by {role} must be refused, it succeeded \
             ({done:?}); the application's trap ran as a superuser {trapped} time(s)"
        ),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&role),
                "the refusal must name the owner {role}: {msg}"
            );
        }
    }
    assert_eq!(trapped, 0, "the application's trap ran as a superuser");
    assert!(
        nothing_installed(&admin).await,
        "a refused install must leave nothing behind"
    );
    // The application's objects are as it left them: owned by it, not taken over.
    let app_owned = query_i64(
        &admin,
        "SELECT count(*) FROM pg_proc AS p JOIN pg_roles AS r ON r.oid = p.proowner
         WHERE p.oid = 'pgfeed._members(regclass)'::regprocedure AND r.rolname = $1::text
           AND p.prosrc LIKE '%SELECT root%'",
        &[&role],
    )
    .await;
    assert_eq!(app_owned, 1, "install replaced the application's function");
}

// ---------------------------------------------------------------------------------------
// CREATE SCHEMA ... CREATE TABLE: the tables it creates are DDL like any other.

#[tokio::test]
async fn tables_created_inside_create_schema_are_captured_or_refused_like_any_other() {
    let setup = setup(
        &format!(
            "{}
             CREATE TABLE orders (id int PRIMARY KEY, tenant text NOT NULL, v text);",
            measurements(&["acme"])
        ),
        &format!(
            "{WATCH_MEASUREMENTS};
             SELECT pgfeed.watch('orders', tenant_column => 'tenant');"
        ),
    )
    .await;
    let Setup { db, app, admin, .. } = &setup;
    let gw = Gateway::start(db).await;
    let mut x = gw.live("x").await;

    // A partition of a watched table, spelled as a subcommand of CREATE SCHEMA.
    app.run(
        "CREATE SCHEMA evil
             CREATE TABLE p PARTITION OF public.measurements FOR VALUES IN ('x')",
    )
    .await;
    // Straight into the new partition, then through the parent as the end marker.
    app.run("INSERT INTO evil.p VALUES (1, 'x', 'direct')")
        .await;
    app.run("UPDATE evil.p SET v = 'direct2' WHERE id = 1")
        .await;
    app.run("INSERT INTO measurements VALUES (2, 'x', 'end')")
        .await;
    assert_eq!(
        summaries_until_end(&mut x).await,
        [
            "insert public.measurements direct",
            "update public.measurements direct2",
            "insert public.measurements end",
        ],
        "rows written straight into a partition created by CREATE SCHEMA must be captured, \
         named as the parent"
    );

    // An inheritance child of a watched table, spelled the same way: refused by pgfeed,
    // and the whole CREATE SCHEMA with it.
    let msg = match app
        .batch_execute("CREATE SCHEMA e2 CREATE TABLE kid () INHERITS (public.orders)")
        .await
    {
        Ok(()) => panic!(
            "CREATE SCHEMA ... CREATE TABLE ... INHERITS (a watched table) succeeded; \
             its parent's statements would bypass the child's rows"
        ),
        Err(e) => server_message(&e),
    };
    assert!(
        msg.starts_with("pgfeed:"),
        "the refusal must be pgfeed's, starting \"pgfeed:\": {msg}"
    );
    assert_eq!(
        query_i64(
            admin,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'e2'",
            &[]
        )
        .await,
        0
    );

    // DDL of another role on tables that have nothing to do with pgfeed still works.
    let other = other_role(&setup).await;
    unrelated_ddl_works(&other).await;
    unrelated_ddl_works(app).await;

    // And the watched tables still capture.
    app.run(
        "INSERT INTO orders VALUES (1, 'x', 'o1');
         INSERT INTO evil.p VALUES (3, 'x', 'end');",
    )
    .await;
    assert_eq!(
        summaries_until_end(&mut x).await,
        ["insert public.orders o1", "insert public.measurements end"]
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// TRUNCATE of a partitioned table.

#[tokio::test]
async fn truncating_a_partitioned_parent_sends_one_truncate() {
    let Setup { db, app, .. } = setup(
        &measurements(&["acme", "globex", "initech"]),
        WATCH_MEASUREMENTS,
    )
    .await;
    app.run(
        "INSERT INTO measurements VALUES (1, 'acme', 'a'), (1, 'globex', 'g'), (1, 'initech', 'i')",
    )
    .await;
    let gw = Gateway::start(&db).await;
    let mut acme = gw.resume("acme", "", "0.0").await;
    assert_eq!(
        op_table_v(&acme.next_change().await),
        "insert public.measurements a"
    );
    assert!(acme.until_live().await.is_empty());

    app.run("TRUNCATE measurements").await;
    app.run("INSERT INTO measurements VALUES (2, 'acme', 'end')")
        .await;
    assert_eq!(
        summaries_until_end(&mut acme).await,
        [
            "truncate public.measurements -",
            "insert public.measurements end"
        ],
        "one TRUNCATE of a parent with 3 partitions is one truncate event"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_second_truncate_in_the_same_transaction_is_not_swallowed() {
    let Setup { db, mut app, .. } = setup(
        &measurements(&["acme", "globex", "initech"]),
        WATCH_MEASUREMENTS,
    )
    .await;
    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;

    let tx = app.transaction().await.unwrap();
    tx.run("TRUNCATE measurements").await;
    tx.run("INSERT INTO measurements VALUES (1, 'acme', 'between')")
        .await;
    tx.run("TRUNCATE measurements").await;
    tx.commit().await.unwrap();
    // A truncate of one partition is a truncate of the parent, once.
    app.run("TRUNCATE measurements_globex").await;
    app.run("INSERT INTO measurements VALUES (2, 'acme', 'end')")
        .await;
    assert_eq!(
        summaries_until_end(&mut acme).await,
        [
            "truncate public.measurements -",
            "insert public.measurements between",
            "truncate public.measurements -",
            "truncate public.measurements -",
            "insert public.measurements end",
        ]
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// The DDL event triggers do not lock watched partitions for DDL on other tables.

#[tokio::test]
async fn ddl_on_other_tables_does_not_wait_for_a_locked_watched_partition() {
    let setup = setup(&measurements(&["acme", "globex"]), WATCH_MEASUREMENTS).await;
    let other = other_role(&setup).await;
    let Setup {
        db, mut app, admin, ..
    } = setup;

    // The application holds a partition of the watched table, as a long migration or a
    // careless open transaction would.
    let holder = app.transaction().await.unwrap();
    holder
        .run("LOCK TABLE measurements_globex IN ACCESS EXCLUSIVE MODE")
        .await;
    unrelated_ddl_works(&other).await;
    // The superuser, too (the event triggers run as their owner in any case).
    unrelated_ddl_works(&admin).await;
    holder.rollback().await.unwrap();

    // Capture is intact once the lock is gone.
    let gw = Gateway::start(&db).await;
    let mut globex = gw.live("globex").await;
    app.run("INSERT INTO measurements_globex VALUES (1, 'globex', 'end')")
        .await;
    assert_eq!(
        summaries_until_end(&mut globex).await,
        ["insert public.measurements end"]
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Re-running install does not wait for the application's transactions.

#[tokio::test]
async fn reinstall_does_not_wait_for_an_open_application_transaction() {
    let Setup { db, mut app, .. } = setup(
        "CREATE TABLE orders (id int PRIMARY KEY, tenant text NOT NULL, v text)",
        "SELECT pgfeed.watch('orders', tenant_column => 'tenant')",
    )
    .await;
    let gw = Gateway::start(&db).await;
    let mut acme = gw.live("acme").await;

    // A watched write, then the application's transaction sits idle, uncommitted.
    let tx = app.transaction().await.unwrap();
    tx.run("INSERT INTO orders VALUES (1, 'acme', 'open')")
        .await;

    // The operator re-runs install (after an upgrade of the binary, say).
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        support::pgfeed_command(&db, &["install"]).output(),
    )
    .await
    .expect("`pgfeed install` waited 10 s for the application's open transaction")
    .expect("running pgfeed");
    assert!(
        out.status.success(),
        "`pgfeed install`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The library path, too.
    let mut installer = db.client().await;
    tokio::time::timeout(
        Duration::from_secs(10),
        pgfeed::schema::install(&mut installer),
    )
    .await
    .expect("pgfeed::schema::install waited 10 s for the application's open transaction")
    .expect("install");

    // The application commits afterwards: its change is delivered.
    tx.commit().await.unwrap();
    app.run("INSERT INTO orders VALUES (2, 'acme', 'end')")
        .await;
    assert_eq!(
        summaries_until_end(&mut acme).await,
        ["insert public.orders open", "insert public.orders end"]
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Capture triggers that no longer fire are reported.

/// The `not_capturing` list of `public.t` in `pgfeed status --json`.
async fn not_capturing(db: &TestDb) -> Vec<String> {
    let entry = support::status_entry(db, "public.t")
        .await
        .expect("status lists public.t");
    entry["not_capturing"]
        .as_array()
        .unwrap_or_else(|| panic!("no not_capturing array: {entry}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn replica_only_or_disabled_capture_triggers_are_reported_as_not_capturing() {
    let Setup { db, app, admin, .. } = setup(
        "CREATE TABLE t (id int PRIMARY KEY, tenant text NOT NULL, v text)",
        "SELECT pgfeed.watch('t', tenant_column => 'tenant')",
    )
    .await;
    let journal = "SELECT count(*) FROM pgfeed.changes";
    assert!(not_capturing(&db).await.is_empty());

    // Replica-only: the trigger stays "enabled" but never fires in an ordinary session.
    app.run("ALTER TABLE t ENABLE REPLICA TRIGGER pgfeed_capture_insert")
        .await;
    let before = query_i64(&admin, journal, &[]).await;
    app.run("INSERT INTO t VALUES (1, 'acme', 'lost')").await;
    assert_eq!(
        query_i64(&admin, journal, &[]).await,
        before,
        "a replica-only trigger fired in an ordinary session"
    );
    assert_eq!(
        not_capturing(&db).await,
        ["public.t"],
        "a replica-only capture trigger captures nothing: status must say so"
    );

    // Always-enabled fires everywhere: that is capturing.
    app.run("ALTER TABLE t ENABLE ALWAYS TRIGGER pgfeed_capture_insert")
        .await;
    assert!(not_capturing(&db).await.is_empty());

    app.run("ALTER TABLE t DISABLE TRIGGER ALL").await;
    assert_eq!(not_capturing(&db).await, ["public.t"]);
    app.run("ALTER TABLE t ENABLE TRIGGER ALL").await;
    assert!(not_capturing(&db).await.is_empty());
}

// ---------------------------------------------------------------------------------------
// Upgrading over settings that schema 3 let go stale.

#[tokio::test]
async fn upgrading_over_an_excluded_column_renamed_under_schema_3_warns() {
    let db = TestDb::empty().await;
    let c = db.client().await;
    c.batch_execute(include_str!("fixtures/schema3.sql"))
        .await
        .expect("the schema-3 fixture applies");
    c.run(
        "CREATE TABLE orders (id serial PRIMARY KEY, tenant text NOT NULL, body text, secret text);
         SELECT pgfeed.watch('orders', 'tenant', '{secret}');
         CREATE TABLE fine (id serial PRIMARY KEY, tenant text NOT NULL, hush text);
         SELECT pgfeed.watch('fine', 'tenant', '{hush}');
         -- Schema 3 has no DDL event trigger: its settings still say `secret`.
         ALTER TABLE orders RENAME COLUMN secret TO hidden;",
    )
    .await;

    let (mut installer, notices) = connect_collecting_notices(&db).await;
    let done = pgfeed::schema::install(&mut installer)
        .await
        .expect("install over schema 3 succeeds");
    assert_eq!((done.from, done.to), (3, pgfeed::schema::VERSION));
    // Notices arrive before the commit's answer; the connection task may still be
    // handing them over.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let warnings = loop {
        let warnings: Vec<String> = notices
            .lock()
            .unwrap()
            .iter()
            .filter(|n| n.starts_with("WARNING:"))
            .cloned()
            .collect();
        if !warnings.is_empty() || tokio::time::Instant::now() > deadline {
            break warnings;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        warnings.iter().any(|w| w.contains("orders")),
        "install must warn that public.orders' excluded column is gone (and may be \
         published); notices: {:?}",
        notices.lock().unwrap()
    );
    assert!(
        !warnings.iter().any(|w| w.contains("fine")),
        "a table whose settings are intact is not warned about: {warnings:?}"
    );

    // Said at every install, so the operator running the CLI sees it too, until the
    // table is watched again with its current columns.
    let out = support::pgfeed_cli(&db, &["install"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "`pgfeed install`: {stderr}");
    assert!(
        stderr.contains("public.orders"),
        "`pgfeed install` must show the warning about public.orders: {stderr}"
    );
    c.run("SELECT pgfeed.watch('orders', 'tenant', '{hidden}')")
        .await;
    let out = support::pgfeed_cli(&db, &["install"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "`pgfeed install`: {stderr}");
    assert!(
        !stderr.contains("public.orders"),
        "watched again with its current columns, public.orders is fine: {stderr}"
    );
}
