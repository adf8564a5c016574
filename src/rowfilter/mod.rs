//! Row filters, the `filter=` parameter: `<table>:<column>=<op>.<value>` with operators
//! `eq`, `neq`, `lt`, `lte`, `gt`, `gte`, `in.(a,b,...)` and `is.null` / `is.true` /
//! `is.false`, compared against the JSON value of the row's column. The table and the
//! column are names by PostgreSQL's rules ([`crate::names`]): `orders:Status=eq.x` means
//! column `status`, `"Orders":"Status"=eq.x` keeps the case.
//!
//! Comparison is typed by the JSON value: a number compares as a number, exactly (digit for
//! digit against the text `to_jsonb` rendered, never through a float, so bigint ids above
//! 2^53 and long numerics compare as PostgreSQL compares them), a string as a string (byte
//! order, not the database's collation), a boolean only for equality. As in SQL, a null
//! column satisfies nothing but `is.null`. Parsing never panics and never touches the
//! database; every malformed filter is an error naming what is wrong.
//!
//! Literals are parsed once, when the filter is parsed (numbers into [`Decimal`], `in`
//! lists into hash sets), so evaluating a filter against a change costs one lookup or one
//! comparison per filter, whatever the length of its `in` list. A change's row is parsed
//! once into a [`Row`] and shared by every subscriber.

mod eval;
mod grammar;
mod literal;
#[cfg(test)]
mod tests;

pub use eval::{Field, Row};
pub use grammar::FilterParseError;
pub use literal::{Decimal, InList, Literal};

/// One parsed filter.
#[derive(Debug, Clone, PartialEq)]
pub struct RowFilter {
    /// The table the filter applies to, `schema.table` as events carry it.
    pub table: String,
    /// Column compared, as the catalog spells it.
    pub column: String,
    /// The condition.
    pub cond: Cond,
}

/// A filter's condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    /// `eq`, `neq`, `lt`, `lte`, `gt`, `gte` with a literal.
    Cmp(CmpOp, Literal),
    /// `in.(a,b,...)`.
    In(InList),
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
