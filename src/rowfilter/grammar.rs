//! The `filter=` grammar: `<table>:<column>=<op>.<value>` into a [`RowFilter`], every
//! malformed filter an error naming what is wrong.

use std::fmt;

use super::{CmpOp, Cond, InList, Literal, RowFilter};
use crate::names;

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
        const SHAPE: &str = "expected <table>:<column>=<op>.<value>, like orders:status=eq.paid";
        let (table, rest) = names::take_table(s)
            .map_err(|e| err(format!("{:?} is not a table name: {e} ({SHAPE})", short(s))))?;
        let rest = rest.strip_prefix(':').ok_or_else(|| {
            err(format!(
                "expected `:` after the table name, found {:?} ({SHAPE})",
                short(rest)
            ))
        })?;
        let (column, expr) = names::take_ident(rest).map_err(|e| {
            err(format!(
                "{:?} is not a column name: {e} ({SHAPE})",
                short(rest)
            ))
        })?;
        let expr = expr.strip_prefix('=').ok_or_else(|| {
            err(format!(
                "expected `=` after the column name, found {:?} ({SHAPE})",
                short(expr)
            ))
        })?;
        let (op, value) = expr.split_once('.').ok_or_else(|| {
            err(format!(
                "expected <op>.<value> after {column}=, like eq.paid"
            ))
        })?;
        let cmp = |op| Ok(Cond::Cmp(op, Literal::new(value)));
        let cond = match op {
            "eq" => cmp(CmpOp::Eq),
            "neq" => cmp(CmpOp::Neq),
            "lt" => cmp(CmpOp::Lt),
            "lte" => cmp(CmpOp::Lte),
            "gt" => cmp(CmpOp::Gt),
            "gte" => cmp(CmpOp::Gte),
            "in" => list_items(value).map(|items| Cond::In(InList::new(items))),
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
            table: table.key(),
            column,
            cond,
        })
    }
}

fn short(s: &str) -> String {
    s.chars().take(64).collect()
}
