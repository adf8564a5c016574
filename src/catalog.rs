//! What the gateway knows of the watched tables: their qualified names and the columns an
//! event can carry (excluded columns left out), so that a request naming an unknown table
//! or column is refused without touching the database.
//!
//! Loaded at start-up, reloaded when `pgfeed.watch`/`unwatch` ring the doorbell with
//! `watch`, after every listener reconnect, and periodically (for `ALTER TABLE`). A request
//! that names a table or column the catalog does not know makes it reload once before it is
//! refused ([`Catalog::reload_since`]): the table may have been watched, or the column
//! added, a moment ago. A stale catalog can only refuse a request it should accept, never
//! widen what anyone sees.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::db::{Db, QueryError, decode};

/// One watched table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// Columns that events carry.
    pub columns: BTreeSet<String>,
    /// Whether every tenant sees it.
    pub public: bool,
}

/// The watched tables by qualified name.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Current contents, replaced whole on reload, with the number of the reload that
    /// read them (a reload that finishes after a later one does not overwrite it).
    tables: RwLock<(u64, Arc<HashMap<String, TableInfo>>)>,
    /// Reloads started, numbered from 1.
    started: AtomicU64,
    /// The highest number of a reload that finished.
    finished: AtomicU64,
    /// Reloads asked for by requests run one at a time: requests that wait meanwhile are
    /// answered by the reload that ran, not each by one of their own.
    on_demand: tokio::sync::Mutex<()>,
}

// Columns by attribute number (schema 4), as capture applies them: with an include list,
// the included columns, the key and the tenant column; else every column not excluded.
// Catalog tables are qualified although every connection pins its search_path.
const WATCHED: &str = "
    SELECT n.nspname || '.' || c.relname, w.public,
           array(SELECT a.attname::text FROM pg_catalog.pg_attribute AS a
                 WHERE a.attrelid = w.tbl AND a.attnum > 0 AND NOT a.attisdropped
                   AND CASE WHEN w.include_attnums IS NULL
                            THEN NOT a.attnum = ANY (w.exclude_attnums)
                            ELSE a.attnum = ANY (w.include_attnums)
                                 OR a.attnum IS NOT DISTINCT FROM w.tenant_attnum
                                 OR a.attname = ANY (w.pk_columns)
                       END
                 ORDER BY a.attnum)
    FROM pgfeed.watched AS w
    JOIN pg_catalog.pg_class AS c ON c.oid = w.tbl
    JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace";

impl Catalog {
    /// The current tables.
    pub fn tables(&self) -> Arc<HashMap<String, TableInfo>> {
        Arc::clone(
            &self
                .tables
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .1,
        )
    }

    /// Replaces the contents (tests and start-up).
    pub fn set(&self, tables: HashMap<String, TableInfo>) {
        let number = self.started.fetch_add(1, Ordering::AcqRel) + 1;
        self.install(number, tables);
    }

    /// Installs what reload `number` read, unless a later reload's contents are there.
    fn install(&self, number: u64, tables: HashMap<String, TableInfo>) {
        let mut current = self
            .tables
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if number > current.0 {
            *current = (number, Arc::new(tables));
        }
        drop(current);
        self.finished.fetch_max(number, Ordering::AcqRel);
    }

    /// A ticket to take before reading [`Catalog::tables`] for a check that may fail: a
    /// reload that finished after it was taken read the database after it.
    pub fn ticket(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }

    /// Reloads from the database. A row that cannot be decoded fails the reload and
    /// leaves the contents as they were.
    pub async fn reload(&self, db: &Db) -> Result<(), QueryError> {
        let number = self.started.fetch_add(1, Ordering::AcqRel) + 1;
        let rows = db.query(WATCHED).await?;
        let tables = rows
            .iter()
            .map(|r| {
                let columns: Vec<String> = decode(r, 2, "a watched table's columns")?;
                let info = TableInfo {
                    columns: columns.into_iter().collect(),
                    public: decode(r, 1, "whether a watched table is public")?,
                };
                Ok((decode(r, 0, "a watched table's name")?, info))
            })
            .collect::<Result<_, QueryError>>()?;
        self.install(number, tables);
        Ok(())
    }

    /// Makes sure that a reload started after `ticket` ([`Catalog::ticket`]) has finished:
    /// for a request naming a table or column the catalog did not know. Single-flight:
    /// such reloads run one at a time, and one that finished while a request waited for its
    /// turn answers that request too, so a crowd of requests (or a client asking for a
    /// table that does not exist, over and over) costs one query at a time.
    pub async fn reload_since(&self, db: &Db, ticket: u64) -> Result<(), QueryError> {
        let _turn = self.on_demand.lock().await;
        if self.finished.load(Ordering::Acquire) > ticket {
            return Ok(());
        }
        self.reload(db).await
    }
}
