//! A subscriber's selection: which tables and ops it wants, how much of each change, and
//! where to start. Parsed from the `/v1/stream` query string; evaluated per change.
//!
//! Parsing is strict (an unknown parameter, op or payload is an error naming it) and never
//! touches the database. Tenant isolation is not decided here but in the router and the
//! stream; a selection can only narrow what a principal may see.

use std::collections::{BTreeSet, HashMap};

use crate::auth::Principal;
use crate::catalog::TableInfo;
use crate::change::{Change, Op, Payload, Position};
use crate::rowfilter::RowFilter;

/// The parsed query of `/v1/stream`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamQuery {
    /// `tables=`: qualified names; `None` means all the caller may see.
    pub tables: Option<BTreeSet<String>>,
    /// `ops=`; `None` means all.
    pub ops: Option<Vec<Op>>,
    /// `payload=`.
    pub payload: Payload,
    /// `last_event_id=`.
    pub last_event_id: Option<Position>,
    /// `access_token=`.
    pub access_token: Option<String>,
    /// `filter=` (repeatable; all must hold).
    pub filters: Vec<RowFilter>,
    /// `tenant=` (only in `auth.mode = "none"`).
    pub tenant: Option<String>,
}

/// A query string that cannot be honoured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    /// A parameter this endpoint does not know.
    #[error(
        "unknown query parameter `{0}` (known: tables, ops, filter, payload, last_event_id, access_token)"
    )]
    Unknown(String),
    /// A parameter given twice.
    #[error("query parameter `{0}` is given more than once")]
    Repeated(String),
    /// A bad value.
    #[error("invalid `{param}`: {message}")]
    Invalid {
        /// The parameter.
        param: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Most `filter=` parameters on one stream.
pub const MAX_FILTERS: usize = 16;

/// Most literals in all the filters of one stream (each `in` item counts): with at most
/// [`MAX_FILTERS`] filters, this bounds a stream's filter memory; its work per change is one
/// comparison or hash lookup per filter.
pub const MAX_FILTER_VALUES: usize = 1000;

fn invalid(param: &'static str, message: impl Into<String>) -> QueryError {
    QueryError::Invalid {
        param,
        message: message.into(),
    }
}

impl StreamQuery {
    /// Parses a raw (still percent-encoded) query string.
    pub fn parse(query: &str) -> Result<StreamQuery, QueryError> {
        let mut q = StreamQuery::default();
        let mut seen = BTreeSet::new();
        let mut values = 0;
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            if key != "filter" && !seen.insert(key.to_string()) {
                return Err(QueryError::Repeated(key.chars().take(64).collect()));
            }
            match &*key {
                "tables" => {
                    let tables = crate::names::table_list(&value).map_err(|e| {
                        invalid(
                            "tables",
                            format!(
                                "{:?} is not a list of table names: {e}",
                                value.chars().take(64).collect::<String>()
                            ),
                        )
                    })?;
                    q.tables = Some(tables.iter().map(crate::names::TableName::key).collect());
                }
                "ops" => {
                    let mut ops = Vec::new();
                    for name in value.split(',').map(str::trim) {
                        let op: Op = name.parse().map_err(|()| {
                            invalid(
                                "ops",
                                format!(
                                    "{:?} is not one of insert, update, delete, truncate",
                                    name.chars().take(64).collect::<String>()
                                ),
                            )
                        })?;
                        if !ops.contains(&op) {
                            ops.push(op);
                        }
                    }
                    q.ops = Some(ops);
                }
                "payload" => {
                    q.payload = match &*value {
                        "full" => Payload::Full,
                        "keys" => Payload::Keys,
                        _ => return Err(invalid("payload", "must be `full` or `keys`")),
                    }
                }
                "last_event_id" => {
                    let position =
                        value
                            .parse()
                            .map_err(|e: crate::change::PositionParseError| {
                                invalid("last_event_id", e.to_string())
                            })?;
                    // `lastEventId` (the newer position) wins, in whichever order they come.
                    q.last_event_id = q.last_event_id.or(Some(position));
                }
                // What `event-source-polyfill` appends on reconnect (it cannot send the
                // `Last-Event-ID` header): the newer position, so it wins over
                // `last_event_id`, which is where the client started.
                "lastEventId" => {
                    q.last_event_id = Some(value.parse().map_err(
                        |e: crate::change::PositionParseError| {
                            invalid("lastEventId", e.to_string())
                        },
                    )?)
                }
                "access_token" => q.access_token = Some(value.into_owned()),
                "tenant" => q.tenant = Some(value.into_owned()),
                "filter" => {
                    if q.filters.len() >= MAX_FILTERS {
                        return Err(invalid(
                            "filter",
                            format!("at most {MAX_FILTERS} filters are allowed"),
                        ));
                    }
                    let filter: RowFilter =
                        value
                            .parse()
                            .map_err(|e: crate::rowfilter::FilterParseError| {
                                invalid("filter", e.to_string())
                            })?;
                    values += filter.values();
                    if values > MAX_FILTER_VALUES {
                        return Err(invalid(
                            "filter",
                            format!(
                                "the filters of one stream may hold at most {MAX_FILTER_VALUES} values in all (each `in` item counts)"
                            ),
                        ));
                    }
                    q.filters.push(filter)
                }
                other => return Err(QueryError::Unknown(other.chars().take(64).collect())),
            }
        }
        Ok(q)
    }
}

/// What one subscriber receives, after authorization.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The tenant whose rows it sees (public tables aside).
    pub tenant: String,
    /// Tables it receives; `None` means every table.
    pub tables: Option<BTreeSet<String>>,
    /// Ops it receives; `None` means all.
    pub ops: Option<Vec<Op>>,
    /// Row filters; a change of a table with filters is received only if all hold.
    pub filters: Vec<RowFilter>,
    /// How much of each change.
    pub payload: Payload,
}

/// A selection that cannot be granted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectionError {
    /// A table outside the token's tables (403).
    #[error("the token does not allow table `{0}`")]
    Forbidden(String),
    /// A table that is not watched (400).
    #[error("table `{0}` is not watched")]
    UnknownTable(String),
    /// A filter on a column events do not carry (400).
    #[error("table `{table}` has no column `{column}` that events carry (filter)")]
    UnknownColumn {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// A filter on a table the stream does not receive (400).
    #[error("the filter names table `{0}`, which is not among the stream's tables")]
    FilterOutsideTables(String),
}

impl Selection {
    /// Combines the principal's rights with the query: asking for a table outside the
    /// principal's tables is refused; omitting `tables` gives the allowed ones. Tables
    /// and filter columns are checked against the catalog of watched tables.
    pub fn new(
        principal: &Principal,
        query: &StreamQuery,
        catalog: &HashMap<String, TableInfo>,
    ) -> Result<Selection, SelectionError> {
        if let Some(asked) = &query.tables {
            if let Some(allowed) = &principal.tables
                && let Some(outside) = asked.iter().find(|t| !allowed.contains(*t))
            {
                return Err(SelectionError::Forbidden(outside.clone()));
            }
            if let Some(unknown) = asked.iter().find(|t| !catalog.contains_key(*t)) {
                return Err(SelectionError::UnknownTable(unknown.clone()));
            }
        }
        let tables = query.tables.clone().or_else(|| principal.tables.clone());
        for filter in &query.filters {
            if tables.as_ref().is_some_and(|t| !t.contains(&filter.table)) {
                return Err(SelectionError::FilterOutsideTables(filter.table.clone()));
            }
            let info = catalog
                .get(&filter.table)
                .ok_or_else(|| SelectionError::UnknownTable(filter.table.clone()))?;
            if !info.columns.contains(&filter.column) {
                return Err(SelectionError::UnknownColumn {
                    table: filter.table.clone(),
                    column: filter.column.clone(),
                });
            }
        }
        Ok(Selection {
            tenant: principal.tenant.clone(),
            tables,
            ops: query.ops.clone(),
            filters: query.filters.clone(),
            payload: query.payload,
        })
    }

    /// Whether this subscriber receives `change`. Checks the tenant too, so that nothing
    /// that reaches a stream by any path can cross tenants.
    pub fn matches(&self, change: &Change) -> bool {
        (change.public || change.tenant.as_deref() == Some(self.tenant.as_str()))
            && self
                .tables
                .as_ref()
                .is_none_or(|t| t.contains(&change.table))
            && self.ops.as_ref().is_none_or(|ops| ops.contains(&change.op))
            && self.rows_match(change)
    }

    /// Row filters: on `new` for inserts, `old` for deletes, either for updates (so that
    /// an update moving a row out of the filter still reaches the client, which can then
    /// drop the row). A truncate affects every row and always passes.
    fn rows_match(&self, change: &Change) -> bool {
        let mut filters = self
            .filters
            .iter()
            .filter(|f| f.table == change.table)
            .peekable();
        if filters.peek().is_none() {
            return true;
        }
        let all = |row: Option<&crate::rowfilter::Row>| {
            row.is_some_and(|row| {
                self.filters
                    .iter()
                    .filter(|f| f.table == change.table)
                    .all(|f| f.matches(row))
            })
        };
        match change.op {
            Op::Insert => all(change.new_row()),
            Op::Delete => all(change.old_row()),
            Op::Update => all(change.new_row()) || all(change.old_row()),
            Op::Truncate => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_everything() {
        let q = StreamQuery::parse("tables=orders,crm.leads&ops=insert,delete&payload=keys&last_event_id=4.2&access_token=a%2Bb").unwrap();
        assert_eq!(
            q.tables.unwrap().into_iter().collect::<Vec<_>>(),
            vec!["crm.leads".to_string(), "public.orders".to_string()]
        );
        assert_eq!(q.ops.unwrap(), vec![Op::Insert, Op::Delete]);
        assert_eq!(q.payload, Payload::Keys);
        assert_eq!(q.last_event_id, Some(Position { commit: 4, ord: 2 }));
        assert_eq!(q.access_token.as_deref(), Some("a+b"));
    }

    #[test]
    fn rejects_bad_input_naming_the_parameter() {
        for (query, param) in [
            ("ops=upsert", "ops"),
            ("payload=rows", "payload"),
            ("last_event_id=abc", "last_event_id"),
            ("tables=a.b.c", "tables"),
            ("tables=", "tables"),
            ("tables=x;drop", "tables"),
            ("tabels=x", "tabels"),
            ("ops=insert&ops=delete", "ops"),
        ] {
            let err = StreamQuery::parse(query).unwrap_err().to_string();
            assert!(err.contains(param), "{query}: {err}");
        }
    }

    fn catalog() -> HashMap<String, TableInfo> {
        let info = |cols: &[&str]| TableInfo {
            columns: cols.iter().map(|c| c.to_string()).collect(),
            public: false,
        };
        HashMap::from([
            (
                "public.orders".to_string(),
                info(&["id", "tenant", "status"]),
            ),
            ("public.invoices".to_string(), info(&["id", "tenant"])),
        ])
    }

    #[test]
    fn tables_claim_narrows_and_forbids() {
        let principal = Principal {
            tenant: "acme".into(),
            tables: Some(["public.orders".to_string()].into()),
            expires_at: None,
        };
        let all = Selection::new(&principal, &StreamQuery::default(), &catalog()).unwrap();
        assert_eq!(all.tables, principal.tables);
        let q = StreamQuery::parse("tables=invoices").unwrap();
        assert_eq!(
            Selection::new(&principal, &q, &catalog()).unwrap_err(),
            SelectionError::Forbidden("public.invoices".into())
        );
    }

    #[test]
    fn tables_and_filters_are_checked_against_the_catalog() {
        let principal = Principal {
            tenant: "acme".into(),
            tables: None,
            expires_at: None,
        };
        let sel = |q: &str| Selection::new(&principal, &StreamQuery::parse(q).unwrap(), &catalog());
        assert!(sel("tables=orders&filter=orders:status=eq.paid").is_ok());
        assert!(sel("filter=orders:status=eq.paid&filter=invoices:id=gt.3").is_ok());
        assert_eq!(
            sel("tables=nope").unwrap_err(),
            SelectionError::UnknownTable("public.nope".into())
        );
        assert!(matches!(
            sel("filter=orders:secret=eq.x").unwrap_err(),
            SelectionError::UnknownColumn { .. }
        ));
        assert_eq!(
            sel("tables=orders&filter=invoices:id=eq.1").unwrap_err(),
            SelectionError::FilterOutsideTables("public.invoices".into())
        );
    }
}
