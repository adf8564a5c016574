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

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::fmt;

use serde_json::Value;
use serde_json::value::RawValue;

use crate::names;

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

/// An exact decimal number: the value `0.d1d2d3... × 10^exp`, with `digits` its
/// significant digits (no leading or trailing zeros; empty for zero). Normalized, so that
/// equal numbers are equal values (`1`, `1.0`, `+10e-1`) and hash alike.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Decimal {
    /// Below zero (never set for zero).
    neg: bool,
    /// Significant digits, ASCII.
    digits: Box<[u8]>,
    /// Decimal exponent of the point before the first digit.
    exp: i64,
}

/// Exponents beyond this are clamped: no literal has that many digits (queries are a few
/// KiB), so clamping keeps every comparison exact.
const EXP_LIMIT: i64 = 1_000_000_000_000_000;

impl Decimal {
    /// Parses a number written as digits with an optional sign, point and exponent
    /// (surrounding ASCII spaces allowed, as PostgreSQL allows them in `numeric` input).
    /// `inf`, `NaN`, hexadecimal, underscores and the like are not numbers.
    pub fn parse(literal: &str) -> Option<Decimal> {
        let t = literal.trim_matches(|c: char| c.is_ascii_whitespace());
        let (neg, body) = match t.as_bytes().first() {
            Some(b'-') => (true, &t[1..]),
            Some(b'+') => (false, &t[1..]),
            _ => (false, t),
        };
        let (mantissa, exponent) = match body.split_once(['e', 'E']) {
            Some((m, e)) => (m, Some(e)),
            None => (body, None),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
            return None;
        }
        let exp = match exponent {
            None => 0,
            Some(e) => {
                let (eneg, e) = match e.as_bytes().first() {
                    Some(b'-') => (true, &e[1..]),
                    Some(b'+') => (false, &e[1..]),
                    _ => (false, e),
                };
                if e.is_empty() || !digits(e) {
                    return None;
                }
                let e = e.trim_start_matches('0');
                let magnitude = if e.len() > 16 {
                    EXP_LIMIT
                } else {
                    e.parse::<i64>().unwrap_or(0).min(EXP_LIMIT)
                };
                if eneg { -magnitude } else { magnitude }
            }
        };
        let all: Vec<u8> = int.bytes().chain(frac.bytes()).collect();
        let leading = all.iter().take_while(|&&b| b == b'0').count();
        let significant = &all[leading..];
        let trailing = significant.iter().rev().take_while(|&&b| b == b'0').count();
        let significant = &significant[..significant.len() - trailing];
        if significant.is_empty() {
            return Some(Decimal {
                neg: false,
                digits: Box::default(),
                exp: 0,
            });
        }
        // At most a few KiB of digits: these fit an i64 with room to spare.
        let point = int.len() as i64 - leading as i64;
        Some(Decimal {
            neg,
            digits: significant.into(),
            exp: point + exp,
        })
    }

    fn signum(&self) -> i8 {
        match (self.digits.is_empty(), self.neg) {
            (true, _) => 0,
            (false, true) => -1,
            (false, false) => 1,
        }
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        let sign = self.signum().cmp(&other.signum());
        if sign != Ordering::Equal || self.signum() == 0 {
            return sign;
        }
        // Same sign, both non-zero: the larger exponent is the larger magnitude; at equal
        // exponents the digits decide (a shorter prefix is smaller: what follows is not 0).
        let magnitude = self
            .exp
            .cmp(&other.exp)
            .then_with(|| self.digits.cmp(&other.digits));
        if self.neg {
            magnitude.reverse()
        } else {
            magnitude
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A filter's literal: its text, and its number when it is written as one (parsed once).
#[derive(Debug, Clone)]
pub struct Literal {
    text: String,
    number: Option<Decimal>,
}

impl Literal {
    /// The literal `text`.
    pub fn new(text: impl Into<String>) -> Literal {
        let text = text.into();
        let number = Decimal::parse(&text);
        Literal { text, number }
    }

    /// The literal as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for Literal {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl From<&str> for Literal {
    fn from(text: &str) -> Literal {
        Literal::new(text)
    }
}

impl From<String> for Literal {
    fn from(text: String) -> Literal {
        Literal::new(text)
    }
}

/// The items of an `in` list, with their texts and numbers in hash sets, so that a lookup
/// costs the same for 2 items or 2 000.
#[derive(Debug, Clone)]
pub struct InList {
    items: Vec<Literal>,
    texts: HashSet<String>,
    numbers: HashSet<Decimal>,
}

impl InList {
    /// The list of `items`.
    pub fn new<T: Into<Literal>>(items: impl IntoIterator<Item = T>) -> InList {
        let items: Vec<Literal> = items.into_iter().map(Into::into).collect();
        let texts = items.iter().map(|l| l.text.clone()).collect();
        let numbers = items.iter().filter_map(|l| l.number.clone()).collect();
        InList {
            items,
            texts,
            numbers,
        }
    }

    /// The items, in the order written.
    pub fn items(&self) -> &[Literal] {
        &self.items
    }

    /// Whether `field` equals one of the items (as `eq` would judge it).
    fn contains(&self, field: &Field) -> bool {
        match field {
            Field::Null => false,
            Field::Number(n) => n.as_ref().is_some_and(|n| self.numbers.contains(n)),
            Field::Text(s) | Field::Json(s) => self.texts.contains(s),
            Field::Bool(b) => self.texts.contains(if *b { "true" } else { "false" }),
        }
    }
}

impl PartialEq for InList {
    fn eq(&self, other: &Self) -> bool {
        self.items == other.items
    }
}

impl<T: Into<Literal>> From<Vec<T>> for InList {
    fn from(items: Vec<T>) -> InList {
        InList::new(items)
    }
}

/// One column of a row, as a filter compares it.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    /// JSON `null` (or a column the row does not have).
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number, exactly as rendered (`None` only for text no number parser accepts).
    Number(Option<Decimal>),
    /// A string.
    Text(String),
    /// An object or array, as compact JSON text.
    Json(String),
}

impl Field {
    fn from_raw(raw: &str) -> Option<Field> {
        Some(match raw.as_bytes().first()? {
            b'"' => Field::Text(serde_json::from_str(raw).ok()?),
            b'n' => Field::Null,
            b't' => Field::Bool(true),
            b'f' => Field::Bool(false),
            b'{' | b'[' => Field::Json(serde_json::from_str::<Value>(raw).ok()?.to_string()),
            _ => Field::Number(Decimal::parse(raw)),
        })
    }

    fn from_value(value: &Value) -> Field {
        match value {
            Value::Null => Field::Null,
            Value::Bool(b) => Field::Bool(*b),
            Value::Number(n) => Field::Number(Decimal::parse(&n.to_string())),
            Value::String(s) => Field::Text(s.clone()),
            other => Field::Json(other.to_string()),
        }
    }
}

/// A row image (a JSON object) parsed for row filters: numbers keep every digit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row(HashMap<String, Field>);

static NULL: Field = Field::Null;

impl Row {
    /// Parses the JSON text of a row image; `None` if it is not a JSON object.
    pub fn parse(json: &str) -> Option<Row> {
        let raw: HashMap<String, &RawValue> = serde_json::from_str(json).ok()?;
        raw.into_iter()
            .map(|(k, v)| Some((k, Field::from_raw(v.get())?)))
            .collect::<Option<HashMap<_, _>>>()
            .map(Row)
    }

    /// A row from a JSON value (numbers as `serde_json` holds them).
    pub fn from_value(value: &Value) -> Row {
        Row(value.as_object().map_or_else(HashMap::new, |o| {
            o.iter()
                .map(|(k, v)| (k.clone(), Field::from_value(v)))
                .collect()
        }))
    }

    /// The column `name`; [`Field::Null`] when the row has no such column.
    pub fn get(&self, name: &str) -> &Field {
        self.0.get(name).unwrap_or(&NULL)
    }
}

/// Orders a column's value against a literal, by the value's type; `None` when they
/// cannot be compared (null, a literal that is not a number for a numeric column, ...).
fn compare(field: &Field, literal: &Literal) -> Option<Ordering> {
    match field {
        Field::Number(n) => Some(n.as_ref()?.cmp(literal.number.as_ref()?)),
        Field::Text(s) => Some(s.as_str().cmp(literal.as_str())),
        Field::Bool(b) => match literal.as_str() {
            "true" => Some(b.cmp(&true)),
            "false" => Some(b.cmp(&false)),
            _ => None,
        },
        Field::Null => None,
        // Objects and arrays only compare equal to their exact JSON text.
        Field::Json(text) => (text == literal.as_str()).then_some(Ordering::Equal),
    }
}

impl RowFilter {
    /// How many literals the filter holds (an `in` list counts each item).
    pub fn values(&self) -> usize {
        match &self.cond {
            Cond::Cmp(..) => 1,
            Cond::In(list) => list.items.len(),
            Cond::IsNull | Cond::IsTrue | Cond::IsFalse => 0,
        }
    }

    /// Whether `row` satisfies the filter.
    pub fn matches(&self, row: &Row) -> bool {
        let field = row.get(&self.column);
        match &self.cond {
            Cond::IsNull => *field == Field::Null,
            Cond::IsTrue => *field == Field::Bool(true),
            Cond::IsFalse => *field == Field::Bool(false),
            Cond::In(list) => list.contains(field),
            Cond::Cmp(op, literal) => match compare(field, literal) {
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

    /// Whether `row` (a JSON object) satisfies the filter; parses the row each call (for
    /// tests; the gateway parses a change's row once, see [`Row::parse`]).
    pub fn matches_row(&self, row: &Value) -> bool {
        self.matches(&Row::from_value(row))
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
                cond: Cond::In(vec!["shipped", "paid"].into())
            }
        );
        assert_eq!(
            f("crm.leads:score=gte.10").cond,
            Cond::Cmp(CmpOp::Gte, "10".into())
        );
        assert_eq!(f("t:a=eq.x.y").cond, Cond::Cmp(CmpOp::Eq, "x.y".into()));
        assert_eq!(
            f(r#"t:a=in.("a,b",c,"q\"")"#).cond,
            Cond::In(vec!["a,b", "c", "q\""].into())
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
        assert_eq!(f(r#"t:s=in.("")"#).cond, Cond::In(vec![""].into()));
    }

    #[test]
    fn numbers_compare_exactly_as_rendered() {
        // 2^53 + 1 and 2^53 are one float; a snowflake id must not match its neighbour.
        let row = Row::parse(
            r#"{"id": 9007199254740992, "n": 123456789012345678901234567890.5, "z": 0.000}"#,
        )
        .unwrap();
        assert!(!f("t:id=eq.9007199254740993").matches(&row));
        assert!(f("t:id=lt.9007199254740993").matches(&row));
        assert!(f("t:id=in.(1,9007199254740992.000)").matches(&row));
        assert!(!f("t:id=in.(1,9007199254740993)").matches(&row));
        assert!(f("t:n=gt.123456789012345678901234567890.4999999").matches(&row));
        assert!(f("t:n=lt.123456789012345678901234567890.50000001").matches(&row));
        assert!(f("t:n=eq.1234567890123456789012345678905e-1").matches(&row));
        assert!(f("t:z=eq.-0").matches(&row) && f("t:z=in.(-0.0)").matches(&row));
        assert!(f("t:z=gt.-1e-999999999999999999999").matches(&row));
        assert!(f("t:z=lt.1e-999999999999999999999").matches(&row));
        for (a, b) in [
            ("-10", "-2"),
            ("0.5", "1"),
            ("-0.1", "0"),
            ("99", "1e2"),
            ("1e-3", "0.01"),
        ] {
            let (a, b) = (Decimal::parse(a).unwrap(), Decimal::parse(b).unwrap());
            assert!(a < b, "{a:?} < {b:?}");
        }
        for bad in [
            "", "-", ".", "1e", "e1", "1_000", "0x10", "inf", "NaN", "1.2.3", "--1",
        ] {
            assert_eq!(Decimal::parse(bad), None, "{bad:?}");
        }
    }
}
