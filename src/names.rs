//! Table and column names as users write them, by PostgreSQL's rules, everywhere a name is
//! given: the CLI (`pgfeed watch`, `unwatch`, `--tenant-column`, ...), the `tables` and
//! `filter` query parameters, and the tables claim of a token.
//!
//! An unquoted identifier starts with a letter (any non-ASCII character counts as one) or
//! `_`, continues with letters, digits, `_` and `$`, and folds to lower case (ASCII letters
//! only, as PostgreSQL folds them): `ORDERS` is `orders`. A quoted identifier keeps its
//! case and may hold any character, `""` standing for a quote: `"Mixed Case"`,
//! `"a.b"`, `"say ""hi"""`. A name longer than 63 bytes is truncated to 63, as PostgreSQL
//! does. A table name is `table` (meaning `public.table`) or `schema.table`. This module
//! never touches the database.

use std::fmt;

/// Longest identifier PostgreSQL keeps (`NAMEDATALEN - 1` bytes); longer ones are cut.
pub const MAX_IDENT_BYTES: usize = 63;

/// A name that does not follow the rules; the message says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameError(String);

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NameError {}

fn err(message: impl Into<String>) -> NameError {
    NameError(message.into())
}

/// At most 64 characters of `s`, for messages.
fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A table: its schema (`public` unless given) and its name, as the catalog spells them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    /// The schema.
    pub schema: String,
    /// The table.
    pub name: String,
}

impl TableName {
    /// Parses a whole table name (surrounding spaces allowed).
    pub fn parse(input: &str) -> Result<TableName, NameError> {
        let (table, rest) = take_table(input.trim())?;
        match rest.chars().next() {
            None => Ok(table),
            Some(c) => Err(err(format!(
                "unexpected {c:?} after the table name (quote a name that holds it: \"...\")"
            ))),
        }
    }

    /// `schema.name`, as events carry it in `table`.
    pub fn key(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// The qualified, quoted SQL name (`"schema"."name"`).
    pub fn sql(&self) -> String {
        format!("{}.{}", quote(&self.schema), quote(&self.name))
    }
}

/// `name` as a quoted SQL identifier.
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn truncate(mut name: String) -> String {
    if name.len() > MAX_IDENT_BYTES {
        let mut end = MAX_IDENT_BYTES;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}

fn ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || !c.is_ascii()
}

fn ident_char(c: char) -> bool {
    ident_start(c) || c.is_ascii_digit() || c == '$'
}

/// Parses one identifier at the start of `s`; returns it and what follows it.
pub fn take_ident(s: &str) -> Result<(String, &str), NameError> {
    if let Some(rest) = s.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' if rest[i + 1..].starts_with('"') => {
                    name.push('"');
                    chars.next();
                }
                '"' => {
                    if name.is_empty() {
                        return Err(err("a quoted name is empty (\"\")"));
                    }
                    return Ok((truncate(name), &rest[i + 1..]));
                }
                '\0' => return Err(err("a name cannot hold a NUL character")),
                c => name.push(c),
            }
        }
        return Err(err(format!(
            "the quoted name \"{} is not closed (a `\"` is missing)",
            short(rest)
        )));
    }
    let end = s
        .char_indices()
        .find(|&(_, c)| !ident_char(c))
        .map_or(s.len(), |(i, _)| i);
    let word = &s[..end];
    match word.chars().next() {
        None => Err(match s.chars().next() {
            None => err("a name is missing"),
            Some(c) => err(format!(
                "expected a name, found {c:?} (quote a name that holds it: \"...\")"
            )),
        }),
        Some(c) if c.is_ascii_digit() || c == '$' => Err(err(format!(
            "{:?}: an unquoted name cannot start with a digit or `$` (quote it: \"...\")",
            short(word)
        ))),
        Some(_) => Ok((truncate(word.to_ascii_lowercase()), &s[end..])),
    }
}

/// Parses a table name (`table` or `schema.table`) at the start of `s`; returns it and
/// what follows it.
pub fn take_table(s: &str) -> Result<(TableName, &str), NameError> {
    let (first, rest) = take_ident(s)?;
    let Some(rest) = rest.strip_prefix('.') else {
        return Ok((
            TableName {
                schema: "public".into(),
                name: first,
            },
            rest,
        ));
    };
    let (second, rest) = take_ident(rest)?;
    if rest.starts_with('.') {
        return Err(err(
            "expected `table` or `schema.table`: a name has at most one `.` outside quotes",
        ));
    }
    Ok((
        TableName {
            schema: first,
            name: second,
        },
        rest,
    ))
}

/// Parses a whole column name.
pub fn column(input: &str) -> Result<String, NameError> {
    let (name, rest) = take_ident(input.trim())?;
    match rest.chars().next() {
        None => Ok(name),
        Some(c) => Err(err(format!(
            "unexpected {c:?} after the column name (quote a name that holds it: \"...\")"
        ))),
    }
}

/// `schema.name` of the table name `input`, as events carry it.
pub fn table_key(input: &str) -> Result<String, NameError> {
    TableName::parse(input).map(|t| t.key())
}

/// A comma-separated list of table names; quoted names may hold commas.
pub fn table_list(input: &str) -> Result<Vec<TableName>, NameError> {
    let mut tables = Vec::new();
    let mut s = input;
    loop {
        let (table, rest) = take_table(s.trim_start())?;
        tables.push(table);
        let rest = rest.trim_start();
        match rest.strip_prefix(',') {
            Some(next) => s = next,
            None if rest.is_empty() => return Ok(tables),
            None => {
                return Err(err(format!(
                    "unexpected {:?} after a table name (names are separated by commas; quote a name that holds other characters: \"...\")",
                    rest.chars().next().unwrap_or(' ')
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_postgresql_rules() {
        let key = |s: &str| table_key(s).unwrap();
        assert_eq!(key("orders"), "public.orders");
        assert_eq!(key("ORDERS"), "public.orders");
        assert_eq!(key("Shop.Orders"), "shop.orders");
        assert_eq!(key(r#""Mixed Case""#), "public.Mixed Case");
        assert_eq!(key(r#""a.b"."x""y""#), "a.b.x\"y");
        assert_eq!(key(r#"shop."Order, Items""#), "shop.Order, Items");
        assert_eq!(key("ÉCOLE"), "public.École");
        assert_eq!(key(" orders "), "public.orders");
        assert_eq!(key(&"a".repeat(70)), format!("public.{}", "a".repeat(63)));
        assert_eq!(
            TableName::parse(r#""x""y""#).unwrap().sql(),
            r#""public"."x""y""#
        );
        for bad in [
            "", "a.b.c", "a..b", "\"open", "a b", "1abc", "$a", "a;drop", "\"\"", ".a", "a.", "a-b",
        ] {
            assert!(TableName::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(column(r#""Total Amount""#).unwrap(), "Total Amount");
        assert_eq!(column("Status").unwrap(), "status");
        assert!(column("a.b").is_err());
        let list: Vec<String> = table_list(r#"orders, "A,B" ,crm.Leads"#)
            .unwrap()
            .iter()
            .map(TableName::key)
            .collect();
        assert_eq!(list, ["public.orders", "public.A,B", "crm.leads"]);
        for bad in ["", "a,", ",a", "a,,b", "a b"] {
            assert!(table_list(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
