//! The SQL side of pgfeed, embedded in the binary: install, upgrade and uninstall the
//! `pgfeed` schema, watch and unwatch tables, and check that the installed schema matches
//! this binary.
//!
//! Install runs in one transaction holding a lock on `pgfeed.meta`, with a pinned
//! `search_path` (what its SQL binds to never depends on the session), applies only the
//! migrations the database lacks, and re-applies the functions, so running it again or
//! after an upgrade is safe. This module never reads journal rows.

use tokio_postgres::Client;

use crate::db::{DecodeError, decode};

/// The schema version this binary expects: the number of the newest migration.
pub const VERSION: i32 = 8;

/// Table migrations, applied in order, each once.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../sql/001_journal.sql")),
    (2, include_str!("../sql/002_lighter_capture.sql")),
    (3, include_str!("../sql/003_render_sandbox.sql")),
    (4, include_str!("../sql/004_ddl_safety.sql")),
    (5, include_str!("../sql/005_commits_never_wait.sql")),
    (6, include_str!("../sql/006_async_seal.sql")),
    (7, include_str!("../sql/007_tenant_replay.sql")),
    (8, include_str!("../sql/008_dropped_exclusions.sql")),
];

/// Functions and triggers, re-applied by every install.
const FUNCTIONS: &str = include_str!("../sql/functions.sql");

/// The first object of schema pgfeed (the schema itself, a relation, a function) owned by
/// a role that is neither the installing role nor a superuser, functions owned by
/// pgfeed_capture apart (the capture functions; install refuses any other object it owns).
const FOREIGN_OWNER: &str = "
    WITH owned(object, owner) AS (
        SELECT 'schema pgfeed', n.nspowner FROM pg_catalog.pg_namespace AS n
        WHERE n.nspname = 'pgfeed'
        UNION ALL
        SELECT 'relation pgfeed.' || c.relname, c.relowner FROM pg_catalog.pg_class AS c
        JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace WHERE n.nspname = 'pgfeed'
        UNION ALL
        SELECT 'function pgfeed.' || p.proname, p.proowner FROM pg_catalog.pg_proc AS p
        JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace WHERE n.nspname = 'pgfeed'
    )
    SELECT o.object, r.rolname::text FROM owned AS o
    JOIN pg_catalog.pg_roles AS r ON r.oid = o.owner
    WHERE r.rolname <> current_user AND NOT r.rolsuper
      AND NOT (r.rolname = 'pgfeed_capture' AND o.object LIKE 'function %')
    LIMIT 1";

/// Run first in install's and uninstall's transaction: a pinned `search_path` (whatever
/// the connection's), and a bounded wait for locks. Installs serialize on `pgfeed.meta`,
/// which only roles with privileges on it can lock: an advisory lock's keys are anyone's.
const INSTALL_PRELUDE: &str = "SET LOCAL search_path = pg_catalog, pg_temp;
     SET LOCAL lock_timeout = '30s';
     SET LOCAL client_min_messages = warning;";

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
    /// A table name given by the user is not a valid name.
    #[error("invalid table name {name:?}: {why}")]
    TableName {
        /// What was given.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// A column name given by the user is not a valid name.
    #[error("invalid column name {name:?}: {why}")]
    ColumnName {
        /// What was given.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// Something in schema pgfeed belongs to another role.
    #[error(
        "{object} is owned by role {owner:?}, not by the installing role: refusing to install into it. \
         A role that owns part of schema pgfeed could make pgfeed run its code with the installer's \
         privileges. Install as that role if it is trusted, or drop or reassign the schema first"
    )]
    ForeignOwner {
        /// What is owned by someone else.
        object: String,
        /// Its owner.
        owner: String,
    },
    /// A column of a result could not be decoded (of another type, or NULL).
    #[error(transparent)]
    Decode(#[from] DecodeError),
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
    tx.batch_execute(INSTALL_PRELUDE).await?;
    // A schema pgfeed, or an object in it, owned by someone else (an application role
    // that owns the database may create the schema before the first install) would let
    // that role replace functions that pgfeed's event triggers run as the installer.
    if let Some(row) = tx.query_opt(FOREIGN_OWNER, &[]).await? {
        return Err(SchemaError::ForeignOwner {
            object: decode(&row, 0, "the foreign-owned object")?,
            owner: decode(&row, 1, "its owner")?,
        });
    }
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS pgfeed;
         CREATE TABLE IF NOT EXISTS pgfeed.meta (
             singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
             version   integer NOT NULL
         );
         LOCK TABLE pgfeed.meta IN SHARE ROW EXCLUSIVE MODE;",
    )
    .await?;
    let from: i32 = match tx.query_opt("SELECT version FROM pgfeed.meta", &[]).await? {
        Some(row) => decode(&row, 0, "pgfeed.meta.version")?,
        None => 0,
    };
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
    tx.batch_execute(INSTALL_PRELUDE).await?;
    let existed = tx
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'pgfeed'",
            &[],
        )
        .await?
        .is_some();
    if existed {
        tx.batch_execute("LOCK TABLE pgfeed.meta IN SHARE ROW EXCLUSIVE MODE")
            .await?;
    }
    // The event triggers first, so that they do not fire for the drop of their own
    // functions; CASCADE then also drops the capture triggers, which depend on pgfeed's
    // functions.
    tx.batch_execute(
        "DROP EVENT TRIGGER IF EXISTS pgfeed_ddl;
         DROP EVENT TRIGGER IF EXISTS pgfeed_drop;
         DROP SCHEMA IF EXISTS pgfeed CASCADE",
    )
    .await?;
    tx.commit().await?;
    Ok(existed)
}

/// Fails unless the installed schema is exactly this binary's version.
pub async fn check(client: &Client) -> Result<(), SchemaError> {
    let row = client
        .query_one(
            "SELECT pg_catalog.to_regclass('pgfeed.meta') IS NOT NULL",
            &[],
        )
        .await?;
    let has_meta: bool = decode(&row, 0, "whether pgfeed.meta exists")?;
    if !has_meta {
        return Err(SchemaError::Missing);
    }
    let found: i32 = match client
        .query_opt("SELECT version FROM pgfeed.meta", &[])
        .await?
    {
        Some(row) => decode(&row, 0, "pgfeed.meta.version")?,
        None => 0,
    };
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
    /// The table as the user wrote it: `orders` (meaning `public.orders`), `shop.orders`,
    /// or with quoted identifiers (`"Shop"."Orders"`). See [`table_name`].
    pub table: String,
    /// The column holding each row's tenant, as the user wrote it (see [`column_name`]).
    pub tenant_column: Option<String>,
    /// Columns that never leave the database, as the user wrote them.
    pub exclude_columns: Vec<String>,
    /// When given, the only columns (with the key and the tenant column) events carry.
    pub include_columns: Option<Vec<String>>,
    /// Every subscriber may see every row.
    pub public: bool,
}

/// A table name given on the command line, as a qualified, quoted SQL name for `regclass`.
///
/// PostgreSQL's rules: unquoted identifiers fold to lower case, quoted ones keep their case
/// and may hold any character (`""` for a quote). A bare name means `public.name`, whatever
/// the session's `search_path` (pgfeed's is pinned, and a path set by an application must
/// never decide which table is watched).
pub fn table_name(input: &str) -> Result<String, SchemaError> {
    crate::names::TableName::parse(input)
        .map(|t| t.sql())
        .map_err(|e| SchemaError::TableName {
            name: input.to_string(),
            why: e.to_string(),
        })
}

/// A column name given on the command line, by the same rules as [`table_name`]:
/// `Tenant` is column `tenant`, `"Tenant"` keeps the case.
pub fn column_name(input: &str) -> Result<String, SchemaError> {
    crate::names::column(input).map_err(|e| SchemaError::ColumnName {
        name: input.to_string(),
        why: e.to_string(),
    })
}

/// Attaches the capture triggers (`pgfeed.watch`).
pub async fn watch(client: &Client, spec: &WatchSpec) -> Result<(), SchemaError> {
    check(client).await?;
    let table = table_name(&spec.table)?;
    let tenant_column = spec.tenant_column.as_deref().map(column_name).transpose()?;
    let columns = |names: &[String]| {
        names
            .iter()
            .map(|c| column_name(c))
            .collect::<Result<Vec<_>, _>>()
    };
    let exclude_columns = columns(&spec.exclude_columns)?;
    let include_columns = spec.include_columns.as_deref().map(columns).transpose()?;
    client
        .execute(
            "SELECT pgfeed.watch($1::text::pg_catalog.regclass, $2::text::pg_catalog.name,
                                 $3::text[]::pg_catalog.name[], $4, $5::text[]::pg_catalog.name[])",
            &[
                &table,
                &tenant_column,
                &exclude_columns,
                &spec.public,
                &include_columns,
            ],
        )
        .await?;
    Ok(())
}

/// Removes the capture triggers (`pgfeed.unwatch`). Returns whether the table was
/// watched: unwatching one that is not (or no longer) is not an error, like watching
/// again; a table that does not exist is.
pub async fn unwatch(client: &Client, table: &str) -> Result<bool, SchemaError> {
    check(client).await?;
    let table = table_name(table)?;
    // The same name resolved twice in a row: a concurrent unwatch in between only makes
    // the answer stale, and the function does nothing then.
    let watched: bool = client
        .query_one(
            "SELECT EXISTS (SELECT FROM pgfeed.watched AS w
                            WHERE w.tbl OPERATOR(pg_catalog.=) $1::text::pg_catalog.regclass)",
            &[&table],
        )
        .await?
        .try_get(0)?;
    client
        .execute(
            "SELECT pgfeed.unwatch($1::text::pg_catalog.regclass)",
            &[&table],
        )
        .await?;
    Ok(watched)
}

/// One watched table, as `pgfeed status` shows it: names as they are now in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    /// Qualified table name.
    pub table: String,
    /// Tenant column, `None` for public tables.
    pub tenant_column: Option<String>,
    /// Columns kept out of events.
    pub exclude_columns: Vec<String>,
    /// Names of excluded columns that were dropped: a column added or renamed under one
    /// of them is kept out too.
    pub exclude_dropped: Vec<String>,
    /// With an include list, the only columns (besides key and tenant) events carry.
    pub include_columns: Option<Vec<String>>,
    /// Whether every subscriber may see it.
    pub public: bool,
    /// Partitions captured with it (empty for an ordinary table).
    pub partitions: Vec<String>,
    /// Tables among it and its partitions whose capture triggers are missing or disabled
    /// (by their owner): their changes are not captured.
    pub not_capturing: Vec<String>,
}

/// The watched tables, with column names read through their attribute numbers, so that
/// what is shown is what capture does.
pub async fn watched(client: &Client) -> Result<Vec<Watched>, SchemaError> {
    check(client).await?;
    let rows = client
        .query(
            "SELECT n.nspname || '.' || c.relname,
                    (SELECT a.attname::text FROM pg_catalog.pg_attribute AS a
                     WHERE a.attrelid = w.tbl AND a.attnum = w.tenant_attnum),
                    ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute AS a
                          WHERE a.attrelid = w.tbl AND a.attnum = ANY (w.exclude_attnums)
                          ORDER BY a.attnum),
                    w.exclude_dropped::text[],
                    CASE WHEN w.include_attnums IS NOT NULL THEN
                        ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute AS a
                              WHERE a.attrelid = w.tbl AND a.attnum = ANY (w.include_attnums)
                              ORDER BY a.attnum)
                    END,
                    w.public,
                    ARRAY(SELECT m::text FROM pgfeed._members(w.tbl) AS m
                          WHERE m <> w.tbl ORDER BY 1),
                    ARRAY(SELECT m::text FROM pgfeed._members(w.tbl) AS m
                          WHERE (SELECT count(*) FROM pg_catalog.pg_trigger AS t
                                 WHERE t.tgrelid = m AND t.tgname LIKE 'pgfeed\\_capture\\_%'
                                   AND t.tgenabled IN ('O', 'A')) < 4
                          ORDER BY 1)
             FROM pgfeed.watched AS w
             JOIN pg_catalog.pg_class AS c ON c.oid = w.tbl
             JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
             ORDER BY 1",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Watched {
                table: decode(r, 0, "a watched table's name")?,
                tenant_column: decode(r, 1, "a watched table's tenant column")?,
                exclude_columns: decode(r, 2, "a watched table's excluded columns")?,
                exclude_dropped: decode(r, 3, "a watched table's dropped excluded names")?,
                include_columns: decode(r, 4, "a watched table's included columns")?,
                public: decode(r, 5, "whether a watched table is public")?,
                partitions: decode(r, 6, "a watched table's partitions")?,
                not_capturing: decode(r, 7, "a watched table's uncaptured members")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::table_name;

    #[test]
    fn table_names_follow_postgresql_rules() {
        assert_eq!(table_name("orders").unwrap(), r#""public"."orders""#);
        assert_eq!(table_name("ORDERS").unwrap(), r#""public"."orders""#);
        assert_eq!(table_name("Shop.Orders").unwrap(), r#""shop"."orders""#);
        assert_eq!(
            table_name(r#""Mixed Case""#).unwrap(),
            r#""public"."Mixed Case""#
        );
        assert_eq!(table_name(r#""a.b"."x""y""#).unwrap(), r#""a.b"."x""y""#);
        // Only ASCII letters fold, as in PostgreSQL.
        assert_eq!(table_name("ÉCOLE").unwrap(), r#""public"."École""#);
        assert_eq!(super::column_name("Tenant").unwrap(), "tenant");
        assert_eq!(super::column_name(r#""Tenant Id""#).unwrap(), "Tenant Id");
        for bad in [
            "", "a.b.c", "a..b", "\"open", "a b", "1abc", "a;drop", "\"\"",
        ] {
            assert!(table_name(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
