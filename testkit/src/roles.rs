//! Login roles for the tests on privileges: cluster-wide roles named after the test's
//! database, connections as them, and the application owner of issue 15.

use crate::{TestDb, connect, server};

/// Creates login role `{db}_{what}` (roles are cluster-wide, so named after the test's
/// database), password `pw`, with no privileges beyond PUBLIC's; returns its name.
pub async fn create_login_role(db: &TestDb, what: &str) -> String {
    create_login_role_with(db, what, "INHERIT").await
}

/// [`create_login_role`] with `inherit` (`INHERIT` or `NOINHERIT`) spelled out.
pub async fn create_login_role_with(db: &TestDb, what: &str, inherit: &str) -> String {
    let role = format!("{}_{what}", db.name);
    connect(&server().url("postgres"))
        .await
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'pw' NOSUPERUSER NOCREATEDB NOCREATEROLE {inherit}"
        ))
        .await
        .unwrap_or_else(|e| panic!("creating role {role}: {e}"));
    role
}

/// Connects to the test database as `role` (password `pw`).
pub async fn connect_as_role(db: &TestDb, role: &str) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = db.url.parse().expect("the test URL parses");
    config.user(role).password("pw");
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting as {role}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// An application role as issue 15 pictures it: not a superuser, owner of the test
/// database and of its `public` schema (as on PostgreSQL 15 through the database owner). Returns its name and a
/// connection as it.
pub async fn app_owner(db: &TestDb, what: &str) -> (String, tokio_postgres::Client) {
    let role = create_login_role(db, what).await;
    db.client()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} OWNER TO {role}; ALTER SCHEMA public OWNER TO {role}",
            db.name
        ))
        .await
        .unwrap_or_else(|e| panic!("handing the database to {role}: {e}"));
    let client = connect_as_role(db, &role).await;
    (role, client)
}
