//! The SQL side of pgfeed, embedded in the binary: install, upgrade and uninstall the
//! `pgfeed` schema, watch and unwatch tables, and check that the installed schema matches
//! this binary.
//!
//! Install runs in one transaction under an advisory lock, applies only the migrations the
//! database lacks, and re-applies the functions, so running it again or after an upgrade
//! is safe. This module never reads journal rows.

use tokio_postgres::Client;

/// The schema version this binary expects: the number of the newest migration.
pub const VERSION: i32 = 3;

/// Table migrations, applied in order, each once.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../sql/001_journal.sql")),
    (2, include_str!("../sql/002_lighter_capture.sql")),
    (3, include_str!("../sql/003_render_sandbox.sql")),
];

/// Functions and triggers, re-applied by every install.
const FUNCTIONS: &str = include_str!("../sql/functions.sql");

/// Advisory lock key (two-int form) that serializes concurrent installs.
const INSTALL_LOCK: (i32, i32) = (1_885_824_612, 0);

/// A schema operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The `pgfeed` schema is not installed.
    #[error("the pgfeed schema is not installed in this database: run `pgfeed install` first")]
    Missing,
    /// The installed schema is older than this binary.
    #[error(
        "the pgfeed schema is at version {found}, this binary needs {expected}: run `pgfeed install` to upgrade it"
    )]
    Outdated {
        /// Installed version.
        found: i32,
        /// [`VERSION`].
        expected: i32,
    },
    /// The installed schema is newer than this binary.
    #[error(
        "the pgfeed schema is at version {found}, newer than this binary's {expected}: upgrade pgfeed"
    )]
    Newer {
        /// Installed version.
        found: i32,
        /// [`VERSION`].
        expected: i32,
    },
    /// A query failed; the message carries PostgreSQL's text and hint.
    #[error("{message}")]
    Query {
        /// [`crate::db::describe`] of the error.
        message: String,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl From<tokio_postgres::Error> for SchemaError {
    fn from(source: tokio_postgres::Error) -> Self {
        SchemaError::Query {
            message: crate::db::describe(&source),
            source,
        }
    }
}

/// What `install` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    /// Version before (0 when the schema was absent).
    pub from: i32,
    /// Version after ([`VERSION`]).
    pub to: i32,
}

/// Installs or upgrades the schema in one transaction.
pub async fn install(client: &mut Client) -> Result<Installed, SchemaError> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[&INSTALL_LOCK.0, &INSTALL_LOCK.1],
    )
    .await?;
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning;
         CREATE SCHEMA IF NOT EXISTS pgfeed;
         CREATE TABLE IF NOT EXISTS pgfeed.meta (
             singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
             version   integer NOT NULL
         );",
    )
    .await?;
    let from: i32 = tx
        .query_opt("SELECT version FROM pgfeed.meta", &[])
        .await?
        .map_or(0, |row| row.get(0));
    if from > VERSION {
        return Err(SchemaError::Newer {
            found: from,
            expected: VERSION,
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > from) {
        tx.batch_execute(sql).await?;
        tracing::debug!(version, "applied schema migration");
    }
    tx.batch_execute(FUNCTIONS).await?;
    tx.execute(
        "INSERT INTO pgfeed.meta (version) VALUES ($1)
         ON CONFLICT (singleton) DO UPDATE SET version = excluded.version",
        &[&VERSION],
    )
    .await?;
    tx.commit().await?;
    Ok(Installed { from, to: VERSION })
}

/// Removes the schema, the journal and every capture trigger. Returns whether it existed.
pub async fn uninstall(client: &mut Client) -> Result<bool, SchemaError> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[&INSTALL_LOCK.0, &INSTALL_LOCK.1],
    )
    .await?;
    let existed = tx
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = 'pgfeed'", &[])
        .await?
        .is_some();
    // CASCADE also drops the capture triggers, which depend on pgfeed's functions.
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning; DROP SCHEMA IF EXISTS pgfeed CASCADE",
    )
    .await?;
    tx.commit().await?;
    Ok(existed)
}

/// Fails unless the installed schema is exactly this binary's version.
pub async fn check(client: &Client) -> Result<(), SchemaError> {
    let has_meta = client
        .query_one("SELECT to_regclass('pgfeed.meta') IS NOT NULL", &[])
        .await?
        .get::<_, bool>(0);
    if !has_meta {
        return Err(SchemaError::Missing);
    }
    let found: i32 = client
        .query_opt("SELECT version FROM pgfeed.meta", &[])
        .await?
        .map_or(0, |row| row.get(0));
    match found {
        0 => Err(SchemaError::Missing),
        v if v < VERSION => Err(SchemaError::Outdated {
            found: v,
            expected: VERSION,
        }),
        v if v > VERSION => Err(SchemaError::Newer {
            found: v,
            expected: VERSION,
        }),
        _ => Ok(()),
    }
}

/// How to watch a table (the arguments of `pgfeed.watch`).
#[derive(Debug, Clone, Default)]
pub struct WatchSpec {
    /// The table, qualified or bare (resolved by PostgreSQL's `regclass`).
    pub table: String,
    /// The column holding each row's tenant.
    pub tenant_column: Option<String>,
    /// Columns that never leave the database.
    pub exclude_columns: Vec<String>,
    /// Every subscriber may see every row.
    pub public: bool,
}

/// Attaches the capture triggers (`pgfeed.watch`).
pub async fn watch(client: &Client, spec: &WatchSpec) -> Result<(), SchemaError> {
    check(client).await?;
    client
        .execute(
            "SELECT pgfeed.watch($1::text::regclass, $2::text::name, $3::text[]::name[], $4)",
            &[
                &spec.table,
                &spec.tenant_column,
                &spec.exclude_columns,
                &spec.public,
            ],
        )
        .await?;
    Ok(())
}

/// Removes the capture triggers (`pgfeed.unwatch`).
pub async fn unwatch(client: &Client, table: &str) -> Result<(), SchemaError> {
    check(client).await?;
    client
        .execute("SELECT pgfeed.unwatch($1::text::regclass)", &[&table])
        .await?;
    Ok(())
}

/// One watched table, as `pgfeed status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    /// Qualified table name.
    pub table: String,
    /// Tenant column, `None` for public tables.
    pub tenant_column: Option<String>,
    /// Columns kept out of events.
    pub exclude_columns: Vec<String>,
    /// Whether every subscriber may see it.
    pub public: bool,
}

/// The watched tables.
pub async fn watched(client: &Client) -> Result<Vec<Watched>, SchemaError> {
    check(client).await?;
    let rows = client
        .query(
            "SELECT n.nspname || '.' || c.relname, w.tenant_column::text,
                    w.exclude_columns::text[], w.public
             FROM pgfeed.watched AS w
             JOIN pg_class AS c ON c.oid = w.tbl
             JOIN pg_namespace AS n ON n.oid = c.relnamespace
             ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Watched {
            table: r.get(0),
            tenant_column: r.get(1),
            exclude_columns: r.get(2),
            public: r.get(3),
        })
        .collect())
}
