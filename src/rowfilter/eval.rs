//! Evaluation: a change's row parsed once into typed [`Field`]s, and a filter's test
//! against it.

use std::cmp::Ordering;
use std::collections::HashMap;

use serde_json::Value;
use serde_json::value::RawValue;

use super::{CmpOp, Cond, Decimal, Literal, RowFilter};

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
