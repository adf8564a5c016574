//! A filter's literals, parsed once: exact decimals, texts, and `in` lists as hash
//! sets.

use std::cmp::Ordering;
use std::collections::HashSet;

use super::Field;

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
    pub(super) number: Option<Decimal>,
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
    pub(super) items: Vec<Literal>,
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
    pub(super) fn contains(&self, field: &Field) -> bool {
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
