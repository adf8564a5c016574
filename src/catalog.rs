//! What the gateway knows of the watched tables: their qualified names and the columns an
//! event can carry (excluded columns left out), so that a request naming an unknown table
//! or column is refused without touching the database.
//!
//! Loaded at start-up, reloaded when `pgfeed.watch`/`unwatch` ring the doorbell with
//! `watch`, after every listener reconnect, and periodically (for `ALTER TABLE`). A stale
//! catalog can only refuse a request it should accept, never widen what anyone sees.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use crate::journal::{Journal, JournalError};

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
    /// Current contents, replaced whole on reload.
    tables: RwLock<Arc<HashMap<String, TableInfo>>>,
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
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Replaces the contents (tests and start-up).
    pub fn set(&self, tables: HashMap<String, TableInfo>) {
        *self
            .tables
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(tables);
    }

    /// Reloads from the database.
    pub async fn reload(&self, journal: &Journal) -> Result<(), JournalError> {
        let rows = journal.query(WATCHED).await?;
        let tables = rows
            .iter()
            .map(|r| {
                let columns: Vec<String> = r.get(2);
                (
                    r.get::<_, String>(0),
                    TableInfo {
                        columns: columns.into_iter().collect(),
                        public: r.get(1),
                    },
                )
            })
            .collect();
        self.set(tables);
        Ok(())
    }
}
