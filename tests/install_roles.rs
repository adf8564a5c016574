//! `pgfeed_capture` and `pgfeed_gateway` are cluster-wide: anyone with CREATEROLE can make
//! them before pgfeed is installed, or change them between installs. Install grants them
//! the journal (write, for capture; read every tenant's changes, for gateways), so it must
//! refuse roles that are not what it would have created: one an attacker can log in as,
//! one with more attributes than NOLOGIN, a capture role with other members (each could
//! write journal rows, i.e. forge events), a role that can grant the gateway role to
//! anyone (ADMIN OPTION), or either role being a member of another role (capture, and the
//! code that renders rows, or a gateway would run with that role's privileges).
//!
//! The test starts a cluster of its own: it changes cluster-wide roles, which every other
//! install in a shared cluster (or on a server given by `PGFEED_TEST_DATABASE_URL`) would
//! see.

use pgfeed::cluster::{Cluster, Search};
use pgfeed_testkit as support;

use support::Run;

/// A cluster of this test's own, with a maintenance connection, handing out new databases.
struct Own {
    cluster: Cluster,
    admin: tokio_postgres::Client,
    databases: usize,
}

impl Own {
    async fn start() -> Own {
        let cluster = tokio::task::spawn_blocking(|| {
            Cluster::start(&Search::local())
                .unwrap_or_else(|e| panic!("cannot start a cluster of this test's own: {e}"))
        })
        .await
        .expect("starting the cluster");
        let admin = support::connect(&cluster.url()).await;
        Own {
            cluster,
            admin,
            databases: 0,
        }
    }

    /// A connection to a new, empty database.
    async fn new_database(&mut self) -> tokio_postgres::Client {
        self.databases += 1;
        let name = format!("roles_{}", self.databases);
        self.admin.run(&format!("CREATE DATABASE {name}")).await;
        let url = format!(
            "postgres://postgres@127.0.0.1:{}/{name}",
            self.cluster.port()
        );
        support::connect(&url).await
    }

    /// Installs into a new database, which must fail; returns the error's text (message
    /// and hint), and checks that nothing was installed.
    async fn refused(&mut self) -> String {
        self.refused_after("").await
    }

    /// [`Own::refused`], in a new database where `sql` ran first (as the superuser).
    async fn refused_after(&mut self, sql: &str) -> String {
        let mut c = self.new_database().await;
        c.run(sql).await;
        let err = match pgfeed::schema::install(&mut c).await {
            Ok(done) => panic!("install succeeded ({done:?}) over a role it must refuse"),
            Err(e) => e.to_string(),
        };
        let schema = support::query_i64(
            &c,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgfeed'",
            &[],
        )
        .await;
        assert_eq!(
            schema, 0,
            "a refused install left schema pgfeed behind: {err}"
        );
        err
    }
}

#[tokio::test]
async fn install_refuses_capture_and_gateway_roles_it_did_not_make_safe() {
    let mut own = Own::start().await;
    let admin = own.new_database().await;
    admin
        .run(
            "CREATE ROLE mallory LOGIN PASSWORD 'pw';
             CREATE ROLE pgfeed_capture LOGIN PASSWORD 'known-to-mallory'",
        )
        .await;

    let err = own.refused().await;
    assert!(
        err.contains("role pgfeed_capture exists with LOGIN")
            && err.contains("ALTER ROLE pgfeed_capture NOLOGIN"),
        "{err}"
    );

    // NOLOGIN now, but mallory was made a member: it could SET ROLE and write journal rows.
    admin
        .run(
            "ALTER ROLE pgfeed_capture NOLOGIN PASSWORD NULL;
             GRANT pgfeed_capture TO mallory",
        )
        .await;
    let err = own.refused().await;
    assert!(
        err.contains("members other than the installing role (mallory)")
            && err.contains("REVOKE pgfeed_capture FROM mallory"),
        "{err}"
    );

    // Revoked, but mallory made a SECURITY DEFINER function owned by pgfeed_capture while
    // a member: it would forge journal rows for anyone allowed to call it.
    admin.run("REVOKE pgfeed_capture FROM mallory").await;
    let err = own
        .refused_after(
            "CREATE FUNCTION public.backdoor(sql text) RETURNS void LANGUAGE plpgsql
                 SECURITY DEFINER AS $$ BEGIN EXECUTE sql; END $$;
             ALTER FUNCTION public.backdoor(text) OWNER TO pgfeed_capture;
             GRANT EXECUTE ON FUNCTION public.backdoor(text) TO PUBLIC",
        )
        .await;
    assert!(
        err.contains("pgfeed_capture owns function public.backdoor(text)"),
        "{err}"
    );

    // pgfeed_capture a member of mallory: capture would run with mallory's privileges.
    admin.run("GRANT mallory TO pgfeed_capture").await;
    let err = own.refused().await;
    assert!(
        err.contains("pgfeed_capture is a member of mallory"),
        "{err}"
    );

    // The gateway role, with an attribute that skips the journal's row-level security.
    admin
        .run(
            "REVOKE mallory FROM pgfeed_capture;
             CREATE ROLE pgfeed_gateway NOLOGIN BYPASSRLS",
        )
        .await;
    let err = own.refused().await;
    assert!(
        err.contains("role pgfeed_gateway exists with BYPASSRLS"),
        "{err}"
    );

    // Mallory may not hand the gateway role out (it reads every tenant's changes)...
    admin
        .run(
            "ALTER ROLE pgfeed_gateway NOBYPASSRLS;
             GRANT pgfeed_gateway TO mallory WITH ADMIN OPTION",
        )
        .await;
    let err = own.refused().await;
    assert!(
        err.contains("pgfeed_gateway can be granted by mallory")
            && err.contains("REVOKE ADMIN OPTION FOR pgfeed_gateway FROM mallory"),
        "{err}"
    );
    // ... nor may the gateway role carry more privileges than its own.
    admin
        .run(
            "REVOKE ADMIN OPTION FOR pgfeed_gateway FROM mallory;
             GRANT pg_write_all_data TO pgfeed_gateway",
        )
        .await;
    let err = own.refused().await;
    assert!(
        err.contains("pgfeed_gateway is a member of pg_write_all_data"),
        "{err}"
    );

    // Made safe, they are used: install succeeds, and a gateway's login role may be a
    // member of pgfeed_gateway (that is what it is for; mallory still is).
    admin
        .run("REVOKE pg_write_all_data FROM pgfeed_gateway")
        .await;
    let mut c = own.new_database().await;
    pgfeed::schema::install(&mut c)
        .await
        .expect("install over roles made safe");
    let owner = support::query_i64(
        &c,
        "SELECT count(*) FROM pg_proc
             WHERE proname = '_capture_insert' AND proowner = 'pgfeed_capture'::regrole",
        &[],
    )
    .await;
    assert_eq!(owner, 1, "capture runs as pgfeed_capture once it is safe");
}
