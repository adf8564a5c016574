//! Row filters, the `filter=` parameter: `<table>:<column>=<op>.<value>` with operators
//! `eq`, `neq`, `lt`, `lte`, `gt`, `gte`, `in.(a,b,...)` and `is.null` / `is.true` /
//! `is.false`, compared against the JSON value of the row's column.
//!
//! Comparison is typed by the JSON value: a number compares as a number, a string as a
//! string (byte order, not the database's collation), a boolean only for equality. As in
//! SQL, a null column satisfies nothing but `is.null`. Parsing never panics and never
//! touches the database; every malformed filter is an error naming what is wrong.

use std::cmp::Ordering;
use std::fmt;

use serde_json::Value;

use crate::auth::qualify;

/// One parsed filter.
#[derive(Debug, Clone, PartialEq)]
pub struct RowFilter {
    /// Qualified table name the filter applies to.
    pub table: String,
    /// Column compared.
    pub column: String,
    /// The condition.
    pub cond: Cond,
}

/// A filter's condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    /// `eq`, `neq`, `lt`, `lte`, `gt`, `gte` with a literal.
    Cmp(CmpOp, String),
    /// `in.(a,b,...)`.
    In(Vec<String>),
    /// `is.null`.
    IsNull,
    /// `is.true`.
    IsTrue,
    /// `is.false`.
    IsFalse,
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// Equal.
    Eq,
    /// Not equal (and not null).
    Neq,
    /// Less than.
    Lt,
    /// Less than or equal.
    Lte,
    /// Greater than.
    Gt,
    /// Greater than or equal.
    Gte,
}

/// Why a filter could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterParseError(String);

impl fmt::Display for FilterParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FilterParseError {}

fn err(message: impl Into<String>) -> FilterParseError {
    FilterParseError(message.into())
}

/// True for an identifier pgfeed accepts in names: letters, digits, `_`, `$`.
pub fn valid_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '$')
}

/// The items of `(a,b,"c,d")`: commas split, double quotes group, `\` escapes.
fn list_items(text: &str) -> Result<Vec<String>, FilterParseError> {
    let inner = text
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| err("`in` takes a list in parentheses, like in.(a,b)"))?;
    if inner.is_empty() {
        return Err(err("`in` needs at least one value"));
    }
    let mut items = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                current.push(chars.next().ok_or_else(|| err("a `\\` ends the list"))?)
            }
            '"' => quoted = !quoted,
            ',' if !quoted => items.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    if quoted {
        return Err(err("an unterminated `\"` in the `in` list"));
    }
    items.push(current);
    Ok(items)
}

impl std::str::FromStr for RowFilter {
    type Err = FilterParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (table, rest) = s.split_once(':').ok_or_else(|| {
            err("expected <table>:<column>=<op>.<value>, like orders:status=eq.paid")
        })?;
        let (column, expr) = rest
            .split_once('=')
            .ok_or_else(|| err("expected <column>=<op>.<value> after the table"))?;
        let parts: Vec<&str> = table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| valid_ident(p)) {
            return Err(err(format!("{:?} is not a table name", short(table))));
        }
        if !valid_ident(column) {
            return Err(err(format!("{:?} is not a column name", short(column))));
        }
        let (op, value) = expr.split_once('.').ok_or_else(|| {
            err(format!(
                "expected <op>.<value> after {column}=, like eq.paid"
            ))
        })?;
        let cmp = |op| Ok(Cond::Cmp(op, value.to_string()));
        let cond = match op {
            "eq" => cmp(CmpOp::Eq),
            "neq" => cmp(CmpOp::Neq),
            "lt" => cmp(CmpOp::Lt),
            "lte" => cmp(CmpOp::Lte),
            "gt" => cmp(CmpOp::Gt),
            "gte" => cmp(CmpOp::Gte),
            "in" => list_items(value).map(Cond::In),
            "is" => match value {
                "null" => Ok(Cond::IsNull),
                "true" => Ok(Cond::IsTrue),
                "false" => Ok(Cond::IsFalse),
                _ => Err(err("`is` takes null, true or false")),
            },
            other => Err(err(format!(
                "{:?} is not an operator (eq, neq, lt, lte, gt, gte, in, is)",
                short(other)
            ))),
        }?;
        Ok(RowFilter {
            table: qualify(table),
            column: column.to_string(),
            cond,
        })
    }
}

fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A literal as a number, if it is written as one: digits with an optional sign, point and
/// exponent. Rust's float parser alone would also take `inf` and `NaN`.
fn number(literal: &str) -> Option<f64> {
    let t = literal.trim();
    let body = t.strip_prefix(['+', '-']).unwrap_or(t);
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e.strip_prefix(['+', '-']).unwrap_or(e))),
        None => (body, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let ok = !(int.is_empty() && frac.is_empty())
        && digits(int)
        && digits(frac)
        && exponent.is_none_or(|e| !e.is_empty() && digits(e));
    if ok { t.parse().ok() } else { None }
}

/// Orders a JSON value against a literal, by the value's type; `None` when they cannot be
/// compared (null, a literal that is not a number for a numeric column, ...).
fn compare(value: &Value, literal: &str) -> Option<Ordering> {
    match value {
        Value::Number(n) => n.as_f64()?.partial_cmp(&number(literal)?),
        Value::String(s) => Some(s.as_str().cmp(literal)),
        Value::Bool(b) => match literal {
            "true" => Some(b.cmp(&true)),
            "false" => Some(b.cmp(&false)),
            _ => None,
        },
        Value::Null => None,
        // Objects and arrays only compare equal to their exact JSON text.
        other => {
            let text = other.to_string();
            (text == literal).then_some(Ordering::Equal)
        }
    }
}

impl RowFilter {
    /// Whether `row` (a JSON object) satisfies the filter.
    pub fn matches_row(&self, row: &Value) -> bool {
        let value = row.get(&self.column).unwrap_or(&Value::Null);
        match &self.cond {
            Cond::IsNull => value.is_null(),
            Cond::IsTrue => value == &Value::Bool(true),
            Cond::IsFalse => value == &Value::Bool(false),
            Cond::In(items) => items
                .iter()
                .any(|i| compare(value, i) == Some(Ordering::Equal)),
            Cond::Cmp(op, literal) => match compare(value, literal) {
                None => false,
                Some(ord) => match op {
                    CmpOp::Eq => ord == Ordering::Equal,
                    CmpOp::Neq => ord != Ordering::Equal,
                    CmpOp::Lt => ord == Ordering::Less,
                    CmpOp::Lte => ord != Ordering::Greater,
                    CmpOp::Gt => ord == Ordering::Greater,
                    CmpOp::Gte => ord != Ordering::Less,
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn f(s: &str) -> RowFilter {
        s.parse().unwrap()
    }

    #[test]
    fn parses_the_grammar() {
        assert_eq!(
            f("orders:status=in.(shipped,paid)"),
            RowFilter {
                table: "public.orders".into(),
                column: "status".into(),
                cond: Cond::In(vec!["shipped".into(), "paid".into()])
            }
        );
        assert_eq!(
            f("crm.leads:score=gte.10").cond,
            Cond::Cmp(CmpOp::Gte, "10".into())
        );
        assert_eq!(f("t:a=eq.x.y").cond, Cond::Cmp(CmpOp::Eq, "x.y".into()));
        assert_eq!(
            f(r#"t:a=in.("a,b",c,"q\"")"#).cond,
            Cond::In(vec!["a,b".into(), "c".into(), "q\"".into()])
        );
        assert_eq!(f("t:a=is.null").cond, Cond::IsNull);
        for bad in [
            "",
            "t",
            "t:a",
            "t:a=",
            "t:a=eq",
            "t:a=like.x",
            "t:a=is.maybe",
            "t:a=in.a,b",
            "t:a=in.()",
            "t:a=in.(\"x)",
            "a.b.c:x=eq.1",
            "t:a b=eq.1",
            ":a=eq.1",
            "t:=eq.1",
        ] {
            assert!(
                bad.parse::<RowFilter>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn compares_by_json_type() {
        let row = json!({"n": 10, "s": "b", "ok": true, "none": null, "big": 123456789012345678901234567890.5});
        assert!(f("t:n=gt.9").matches_row(&row));
        assert!(
            f("t:n=eq.10.0").matches_row(&row),
            "numbers compare as numbers"
        );
        assert!(!f("t:n=gt.10").matches_row(&row));
        assert!(f("t:n=lte.10").matches_row(&row));
        assert!(
            !f("t:n=lt.abc").matches_row(&row),
            "a non-number never matches a number"
        );
        assert!(f("t:s=lt.c").matches_row(&row) && f("t:s=gte.b").matches_row(&row));
        assert!(f("t:s=in.(a,b)").matches_row(&row));
        assert!(f("t:ok=is.true").matches_row(&row) && f("t:ok=eq.true").matches_row(&row));
        assert!(!f("t:ok=is.false").matches_row(&row));
        assert!(f("t:none=is.null").matches_row(&row) && f("t:missing=is.null").matches_row(&row));
        assert!(
            !f("t:none=eq.x").matches_row(&row) && !f("t:none=neq.x").matches_row(&row),
            "null matches nothing"
        );
        assert!(f("t:big=gt.1e29").matches_row(&row));
        assert!(
            !f("t:n=lt.inf").matches_row(&row) && !f("t:n=neq.NaN").matches_row(&row),
            "not numbers"
        );
        assert!(f("t:n=eq.+1e1").matches_row(&row) && f("t:n=gt.-.5").matches_row(&row));
        assert_eq!(f(r#"t:s=in.("")"#).cond, Cond::In(vec![String::new()]));
    }
}
