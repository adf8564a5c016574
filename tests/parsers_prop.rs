//! Property tests for everything that parses client input: the `/v1/stream` query string,
//! row filters, positions (`Last-Event-ID`) and tokens. For arbitrary and near-valid input
//! nothing panics and errors stay small; valid input parses to exactly what was meant; and
//! over real HTTP, random queries and headers always get a 200 stream or a 4xx JSON error,
//! never a 5xx and never a hang.

use pgfeed_testkit as support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pgfeed::auth::{AuthError, Authenticator};
use pgfeed::change::{Op, Payload, Position};
use pgfeed::config::AuthConfig;
use pgfeed::filter::StreamQuery;
use pgfeed::names::table_key;
use pgfeed::rowfilter::{CmpOp, Cond, InList, Row, RowFilter};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use serde_json::{Value, json};
use support::{Gateway, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest error message any parser may produce: errors quote at most 64 characters of
/// the input, so a huge input never comes back whole.
const MAX_MESSAGE: usize = 1024;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// An unquoted identifier as the catalog spells it: a letter (any script) or `_`, then
/// letters, digits, `_`, `$`; at most 63 bytes, as in PostgreSQL.
fn ident() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z_][a-z0-9_$]{0,15}",
        1 => "[a-zé漢_][a-z0-9_$é漢]{0,20}",
    ]
}

/// A name as a user writes it, with the name it means: unquoted (folded to lower case)
/// or quoted (any characters, `""` for a quote, case kept).
fn name() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        3 => ident().prop_map(|n| (n.clone(), n)),
        1 => "[A-Z][A-Za-z0-9_]{0,10}".prop_map(|n| (n.clone(), n.to_ascii_lowercase())),
        1 => "[^\\x00]{1,15}".prop_map(|n| (format!("\"{}\"", n.replace('"', "\"\"")), n)),
    ]
}

/// A table name as written, bare or qualified, with its key (`schema.table`).
fn table() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        name().prop_map(|(text, n)| (text, format!("public.{n}"))),
        (name(), name()).prop_map(|((st, s), (tt, t))| (format!("{st}.{tt}"), format!("{s}.{t}"))),
    ]
}

fn cmp_op() -> impl Strategy<Value = (CmpOp, &'static str)> {
    prop_oneof![
        Just((CmpOp::Eq, "eq")),
        Just((CmpOp::Neq, "neq")),
        Just((CmpOp::Lt, "lt")),
        Just((CmpOp::Lte, "lte")),
        Just((CmpOp::Gt, "gt")),
        Just((CmpOp::Gte, "gte")),
    ]
}

/// An `in` list item, written quoted (escaping `"` and `\`) or, when it can be, bare.
fn in_item() -> impl Strategy<Value = (String, String)> {
    (any::<String>(), any::<bool>()).prop_map(|(item, quote)| {
        let bare_ok = !item.contains([',', '"']);
        let text = if quote || !bare_ok {
            let mut t = String::from('"');
            for c in item.chars() {
                if c == '"' || c == '\\' {
                    t.push('\\');
                }
                t.push(c);
            }
            t.push('"');
            t
        } else {
            item.clone()
        };
        (item, text)
    })
}

/// A valid filter as text, with the filter it must parse to.
fn valid_filter() -> impl Strategy<Value = (String, RowFilter)> {
    let cond = prop_oneof![
        (cmp_op(), any::<String>())
            .prop_map(|((op, name), v)| (format!("{name}.{v}"), Cond::Cmp(op, v.into()))),
        prop::collection::vec(in_item(), 1..6)
            .prop_filter("a single empty item is no list", |items| {
                !(items.len() == 1 && items[0].0.is_empty())
            })
            .prop_map(|items| {
                let text: Vec<&str> = items.iter().map(|(_, t)| t.as_str()).collect();
                (
                    format!("in.({})", text.join(",")),
                    Cond::In(InList::new(items.into_iter().map(|(i, _)| i))),
                )
            }),
        Just(("is.null".to_string(), Cond::IsNull)),
        Just(("is.true".to_string(), Cond::IsTrue)),
        Just(("is.false".to_string(), Cond::IsFalse)),
    ];
    (table(), name(), cond).prop_map(|((table, key), (column_text, column), (text, cond))| {
        (
            format!("{table}:{column_text}={text}"),
            RowFilter {
                table: key,
                column,
                cond,
            },
        )
    })
}

/// Text that is almost a filter: the grammar's pieces with its delimiters sprinkled in.
fn near_filter() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        ident(),
        Just(String::new()),
        "[:=.(),\"\\\\ a-z0-9]{0,8}",
        prop_oneof![
            Just("eq"),
            Just("in"),
            Just("is"),
            Just("lte"),
            Just("null"),
            Just("like")
        ]
        .prop_map(str::to_string),
    ];
    (
        prop::collection::vec(piece, 1..6),
        prop::collection::vec(
            prop_oneof![Just(":"), Just("="), Just("."), Just("("), Just(")")],
            0..6,
        ),
    )
        .prop_map(|(pieces, seps)| {
            let mut s = String::new();
            for (i, p) in pieces.iter().enumerate() {
                s.push_str(p);
                if let Some(sep) = seps.get(i) {
                    s.push_str(sep);
                }
            }
            s
        })
}

fn position() -> impl Strategy<Value = Position> {
    (0..=i64::MAX, 0..=i32::MAX).prop_map(|(commit, ord)| Position { commit, ord })
}

/// Text that is almost a position.
fn near_position() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{0,25}\\.[0-9]{0,12}",
        "[-+0-9. ]{0,12}",
        "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}",
        any::<String>(),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(prop::sample::select(Op::ALL.to_vec()), 1..6)
}

/// A valid query with the `StreamQuery` it must parse to, percent-encoded.
fn valid_query() -> impl Strategy<Value = (String, StreamQuery)> {
    (
        prop::option::of(prop::collection::vec(table(), 1..4)),
        prop::option::of(ops()),
        prop::option::of(prop_oneof![Just(Payload::Full), Just(Payload::Keys)]),
        prop::option::of(position()),
        prop::option::of(any::<String>()),
        prop::collection::vec(valid_filter(), 0..4),
        prop::option::of(any::<String>()),
    )
        .prop_map(|(tables, ops, payload, last, token, filters, tenant)| {
            let mut pairs: Vec<(String, String)> = Vec::new();
            let mut q = StreamQuery::default();
            if let Some(t) = tables {
                let texts: Vec<&str> = t.iter().map(|(text, _)| text.as_str()).collect();
                pairs.push(("tables".into(), texts.join(",")));
                q.tables = Some(t.into_iter().map(|(_, key)| key).collect::<BTreeSet<_>>());
            }
            if let Some(o) = ops {
                let names: Vec<&str> = o.iter().map(|op| op.as_str()).collect();
                pairs.push(("ops".into(), names.join(",")));
                let mut dedup = Vec::new();
                for op in o {
                    if !dedup.contains(&op) {
                        dedup.push(op);
                    }
                }
                q.ops = Some(dedup);
            }
            if let Some(p) = payload {
                let name = if p == Payload::Keys { "keys" } else { "full" };
                pairs.push(("payload".into(), name.into()));
                q.payload = p;
            }
            if let Some(p) = last {
                pairs.push(("last_event_id".into(), p.to_string()));
                q.last_event_id = Some(p);
            }
            if let Some(t) = token {
                pairs.push(("access_token".into(), t.clone()));
                q.access_token = Some(t);
            }
            for (text, f) in filters {
                pairs.push(("filter".into(), text));
                q.filters.push(f);
            }
            if let Some(t) = tenant {
                pairs.push(("tenant".into(), t.clone()));
                q.tenant = Some(t);
            }
            let encoded = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(pairs)
                .finish();
            (encoded, q)
        })
}

/// A query that is almost valid: known and unknown keys with near-valid values, encoded
/// or raw.
fn near_query() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        prop::sample::select(vec![
            "tables",
            "ops",
            "payload",
            "last_event_id",
            "access_token",
            "filter",
            "tenant",
        ])
        .prop_map(str::to_string),
        "[a-z_%0-9]{0,10}",
    ];
    let value = prop_oneof![
        prop::collection::vec(table(), 0..4).prop_map(|t| t
            .into_iter()
            .map(|(text, _)| text)
            .collect::<Vec<_>>()
            .join(",")),
        "[a-z,]{0,30}",
        near_filter(),
        near_position(),
        any::<String>(),
    ];
    (
        prop::collection::vec((key, value, any::<bool>()), 0..8),
        "[&=]{0,2}",
    )
        .prop_map(|(pairs, tail)| {
            let mut out = String::new();
            for (i, (k, v, encode)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push('&');
                }
                if *encode {
                    out.push_str(
                        &form_urlencoded::Serializer::new(String::new())
                            .append_pair(k, v)
                            .finish(),
                    );
                } else {
                    out.push_str(k);
                    out.push('=');
                    out.push_str(v);
                }
            }
            out.push_str(&tail);
            out
        })
}

// ---------------------------------------------------------------------------------------
// Pure parsers
// ---------------------------------------------------------------------------------------

/// A numeric tenant claim names the tenant its issuer wrote: the claim's number must be
/// parsed exactly (serde_json's `float_roundtrip`), or a float off by its last bit names
/// another tenant. Found by `signed_claims_are_judged_by_their_content`.
#[test]
fn numeric_tenant_claims_keep_every_bit() {
    let a = authenticator();
    for tenant in [-1.897_532_889_728_002_2e-169, 0.1 + 0.2, 1e300, 42.0] {
        let claims = json!({"exp": 4_000_000_000u64, "tenant_id": tenant});
        let p = a
            .authenticate(&sign(&Header::new(Algorithm::HS256), &claims))
            .unwrap_or_else(|e| panic!("{claims}: {e:?}"));
        assert_eq!(
            p.tenant,
            serde_json::Number::from_f64(tenant).unwrap().to_string()
        );
    }
}

/// 512 cases a property, no regression file: integration tests have no lib.rs for
/// proptest to file regressions beside.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn stream_query_never_panics(query in prop_oneof![any::<String>(), near_query()]) {
        if let Err(e) = StreamQuery::parse(&query) {
            let message = e.to_string();
            prop_assert!(!message.is_empty());
            prop_assert!(message.len() <= MAX_MESSAGE, "{} bytes: {message}", message.len());
        }
    }

    #[test]
    fn valid_queries_parse_to_what_was_meant((query, expected) in valid_query()) {
        let parsed = StreamQuery::parse(&query);
        prop_assert_eq!(parsed, Ok(expected), "query: {}", query);
    }

    #[test]
    fn a_repeated_parameter_is_refused(
        (query, _) in valid_query(),
        key in prop::sample::select(vec!["tables", "ops", "payload", "last_event_id", "access_token", "tenant"]),
    ) {
        let single = StreamQuery::parse(&query).unwrap();
        let has = match key {
            "tables" => single.tables.is_some(),
            "ops" => single.ops.is_some(),
            "payload" => query.contains("payload="),
            "last_event_id" => single.last_event_id.is_some(),
            "access_token" => single.access_token.is_some(),
            _ => single.tenant.is_some(),
        };
        prop_assume!(has);
        let value = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
            .unwrap();
        let twice = format!(
            "{query}&{}",
            form_urlencoded::Serializer::new(String::new()).append_pair(key, &value).finish()
        );
        let err = StreamQuery::parse(&twice).unwrap_err().to_string();
        prop_assert!(err.contains(key), "{}", err);
    }

    #[test]
    fn row_filter_never_panics(text in prop_oneof![any::<String>(), near_filter()]) {
        match text.parse::<RowFilter>() {
            Ok(f) => {
                // Whatever parses names a plausible table and column.
                prop_assert!(f.table.contains('.'), "{:?}", f);
                prop_assert!(!f.column.is_empty() && f.column.len() <= 63, "{:?}", f);
            }
            Err(e) => {
                let message = e.to_string();
                prop_assert!(!message.is_empty());
                prop_assert!(message.len() <= MAX_MESSAGE, "{} bytes: {message}", message.len());
            }
        }
    }

    #[test]
    fn valid_filters_parse_to_their_parts((text, expected) in valid_filter()) {
        prop_assert_eq!(text.parse::<RowFilter>(), Ok(expected), "filter: {}", text);
    }

    #[test]
    fn filters_evaluate_consistently(
        (_, filter) in valid_filter(),
        value in json_value(),
        present in any::<bool>(),
    ) {
        let mut row = serde_json::Map::new();
        if present {
            row.insert(filter.column.clone(), value.clone());
        }
        let row = Value::Object(row);
        let matched = filter.matches_row(&row);
        let with = |cond: Cond| RowFilter { cond, ..filter.clone() }.matches_row(&row);
        match &filter.cond {
            Cond::IsNull => prop_assert_eq!(matched, !present || value.is_null()),
            Cond::IsTrue => prop_assert_eq!(matched, present && value == Value::Bool(true)),
            Cond::IsFalse => prop_assert_eq!(matched, present && value == Value::Bool(false)),
            Cond::In(items) => {
                // `in` is a disjunction of `eq`.
                let any_eq = items.items().iter().any(|i| with(Cond::Cmp(CmpOp::Eq, i.clone())));
                prop_assert_eq!(matched, any_eq);
            }
            Cond::Cmp(_, literal) => {
                let l = literal.clone();
                let eq = with(Cond::Cmp(CmpOp::Eq, l.clone()));
                let neq = with(Cond::Cmp(CmpOp::Neq, l.clone()));
                let lt = with(Cond::Cmp(CmpOp::Lt, l.clone()));
                let lte = with(Cond::Cmp(CmpOp::Lte, l.clone()));
                let gt = with(Cond::Cmp(CmpOp::Gt, l.clone()));
                let gte = with(Cond::Cmp(CmpOp::Gte, l));
                prop_assert!(!(eq && neq), "eq and neq on {row}");
                prop_assert!(!(lt && gte || gt && lte), "order on {row}");
                prop_assert_eq!(lte, lt || eq, "lte on {}", row);
                prop_assert_eq!(gte, gt || eq, "gte on {}", row);
                // A null or missing column satisfies no comparison.
                if !present || value.is_null() {
                    prop_assert!(!(eq || neq || lt || gt), "null on {row}");
                }
            }
        }
    }

    #[test]
    fn position_never_panics(text in prop_oneof![any::<String>(), near_position()]) {
        match text.parse::<Position>() {
            Ok(p) => {
                // Accepted text is digits, one dot, digits, and means what it says.
                let (c, o) = text.split_once('.').unwrap();
                prop_assert!(c.bytes().all(|b| b.is_ascii_digit()) && !c.is_empty());
                prop_assert!(o.bytes().all(|b| b.is_ascii_digit()) && !o.is_empty());
                prop_assert_eq!(c.parse::<i64>().ok(), Some(p.commit));
                prop_assert_eq!(o.parse::<i32>().ok(), Some(p.ord));
                prop_assert_eq!(p.to_string().parse::<Position>().unwrap(), p);
            }
            Err(e) => {
                let message = e.to_string();
                prop_assert!(message.len() <= MAX_MESSAGE, "{} bytes", message.len());
                // Refused only if not digits.digits, or out of range.
                if let Some((c, o)) = text.split_once('.') {
                    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
                    if digits(c) && digits(o) {
                        prop_assert!(
                            c.parse::<i64>().is_err() || o.parse::<i32>().is_err(),
                            "{:?} refused: {}", text, message
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn position_round_trips(p in position()) {
        let text = p.to_string();
        prop_assert_eq!(text.parse::<Position>().unwrap(), p);
        prop_assert_eq!(text.parse::<Position>().unwrap().to_string(), text);
    }

    #[test]
    fn positions_order_like_their_numbers(a in position(), b in position()) {
        prop_assert_eq!(a.cmp(&b), (a.commit, a.ord).cmp(&(b.commit, b.ord)));
    }
}

/// Arbitrary JSON, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        "[a-z0-9.]{0,6}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

// ---------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------

const SECRET: &str = "prop-secret-0123456789abcdef";

/// A tables claim that tokens may omit.
fn authenticator() -> Authenticator {
    let mut auth = AuthConfig::hs256(SECRET);
    auth.tables_claim = Some("tables".into());
    auth.tables_claim_optional = true;
    Authenticator::new(&auth).unwrap()
}

/// A tables claim that tokens must carry (the default once it is configured).
fn strict_authenticator() -> Authenticator {
    let mut auth = AuthConfig::hs256(SECRET);
    auth.tables_claim = Some("tables".into());
    Authenticator::new(&auth).unwrap()
}

fn sign(header: &Header, claims: &Value) -> String {
    jsonwebtoken::encode(header, claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

#[derive(Debug, Clone)]
enum Exp {
    Missing,
    Future(u64),
    Past(u64),
}

/// Claims correctly signed, with the outcome they must have.
/// What signed claims must give: the tenant and tables, or the kind of refusal.
type Outcome = Result<(String, Option<BTreeSet<String>>), &'static str>;

fn signed_claims() -> impl Strategy<Value = (Value, Outcome)> {
    let exp = prop_oneof![
        1 => Just(Exp::Missing),
        4 => (60u64..1_000_000).prop_map(Exp::Future),
        1 => (60u64..1_000_000).prop_map(Exp::Past),
    ];
    let tenant = prop_oneof![
        4 => any::<String>().prop_map(Value::String),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => json_value(),
        1 => Just(Value::Null),
    ];
    let tables = prop::option::of(prop_oneof![
        3 => prop::collection::vec(any::<String>(), 0..4)
            .prop_map(|v| Value::Array(v.into_iter().map(Value::String).collect())),
        1 => json_value(),
    ]);
    (exp, prop::option::of(tenant), tables, "[a-z]{0,6}").prop_map(|(exp, tenant, tables, sub)| {
        let now = now();
        let mut claims = serde_json::Map::new();
        claims.insert("sub".into(), Value::String(sub));
        match exp {
            Exp::Missing => {}
            Exp::Future(d) => {
                claims.insert("exp".into(), Value::from(now + d));
            }
            Exp::Past(d) => {
                claims.insert("exp".into(), Value::from(now - d));
            }
        }
        if let Some(t) = &tenant {
            claims.insert("tenant_id".into(), t.clone());
        }
        if let Some(t) = &tables {
            claims.insert("tables".into(), t.clone());
        }
        let expected_tenant = match &tenant {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        // The tables claim is configured: a token without it is refused (fails closed).
        let expected_tables: Result<Option<BTreeSet<String>>, &'static str> = match &tables {
            None => Err("no tables"),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .and_then(|t| table_key(t).ok())
                        .ok_or("bad tables")
                })
                .collect::<Result<BTreeSet<_>, _>>()
                .map(Some),
            Some(_) => Err("bad tables"),
        };
        let expected = match (&exp, expected_tenant, expected_tables) {
            (Exp::Missing, _, _) => Err("invalid"),
            (Exp::Past(_), _, _) => Err("expired"),
            (_, None, _) => Err("no tenant"),
            (_, _, Err(why)) => Err(why),
            (_, Some(t), Ok(tables)) => Ok((t, tables)),
        };
        (Value::Object(claims), expected)
    })
}

/// Any header an attacker might send, signed with the right secret.
fn any_header() -> impl Strategy<Value = Header> {
    (
        prop::sample::select(vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]),
        prop::option::of(any::<String>()),
        prop::option::of("[A-Za-z]{0,5}"),
    )
        .prop_map(|(alg, kid, typ)| {
            let mut h = Header::new(alg);
            h.kid = kid;
            h.typ = typ;
            h
        })
}

/// Three dot-separated segments of base64url text, or JSON, or nothing in particular.
fn token_like() -> impl Strategy<Value = String> {
    let b64 = |bytes: Vec<u8>| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    };
    prop_oneof![
        any::<String>(),
        "[A-Za-z0-9_.-]{0,80}",
        (
            prop::collection::vec(any::<u8>(), 0..40),
            prop::collection::vec(any::<u8>(), 0..60),
            prop::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(move |(a, b, c)| format!("{}.{}.{}", b64(a), b64(b), b64(c))),
        (json_value(), json_value(), "[A-Za-z0-9_-]{0,43}").prop_map(move |(h, p, s)| {
            format!(
                "{}.{}.{s}",
                b64(h.to_string().into_bytes()),
                b64(p.to_string().into_bytes())
            )
        }),
        (
            prop::sample::select(vec![
                "none", "None", "NONE", "HS256", "RS256", "ES256", "EdDSA", ""
            ]),
            json_value(),
        )
            .prop_map(move |(alg, claims)| {
                format!(
                    "{}.{}.",
                    b64(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#).into_bytes()),
                    b64(claims.to_string().into_bytes())
                )
            }),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn authenticate_never_panics(token in token_like()) {
        let a = authenticator();
        // Nothing unsigned or garbled is ever accepted.
        prop_assert!(a.authenticate(&token).is_err(), "accepted {:?}", token);
    }

    #[test]
    fn signed_claims_are_judged_by_their_content((claims, expected) in signed_claims()) {
        let a = strict_authenticator();
        let token = sign(&Header::new(Algorithm::HS256), &claims);
        let got = a.authenticate(&token);
        match (&got, &expected) {
            (Ok(p), Ok((tenant, tables))) => {
                prop_assert_eq!(&p.tenant, tenant);
                prop_assert_eq!(&p.tables, tables);
                // The stream ends when the token stops being accepted: exp plus the leeway.
                let until = claims["exp"]
                    .as_u64()
                    .map(|exp| std::time::UNIX_EPOCH + Duration::from_secs(exp) + AuthConfig::hs256(SECRET).leeway);
                prop_assert_eq!(p.expires_at, until);
            }
            (Err(AuthError::Invalid(_)), Err("invalid"))
            | (Err(AuthError::Expired), Err("expired"))
            | (Err(AuthError::NoTenant(_)), Err("no tenant"))
            | (Err(AuthError::BadTables(_)), Err("bad tables"))
            | (Err(AuthError::NoTables(_)), Err("no tables")) => {}
            _ => prop_assert!(false, "claims {} gave {:?}, expected {:?}", claims, got, expected),
        }
    }

    #[test]
    fn only_hs256_is_accepted(header in any_header(), tenant in "[a-z]{1,8}") {
        let a = authenticator();
        let claims = json!({"tenant_id": tenant, "exp": now() + 600});
        let got = a.authenticate(&sign(&header, &claims));
        if header.alg == Algorithm::HS256 {
            prop_assert!(got.is_ok(), "{:?}: {:?}", header, got);
        } else {
            prop_assert_eq!(got, Err(AuthError::Invalid("algorithm not allowed")));
        }
    }

    #[test]
    fn any_changed_character_is_refused(
        tenant in "[a-z]{1,8}",
        at in any::<prop::sample::Index>(),
        with in prop::sample::select(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".chars().collect::<Vec<_>>()
        ),
    ) {
        let a = authenticator();
        let token = sign(
            &Header::new(Algorithm::HS256),
            &json!({"tenant_id": tenant, "exp": now() + 600}),
        );
        prop_assert!(a.authenticate(&token).is_ok());
        // Any character but a segment's last (whose low bits may be padding) changes the
        // decoded bytes.
        let chars: Vec<char> = token.chars().collect();
        let candidates: Vec<usize> = (0..chars.len())
            .filter(|&i| {
                chars[i] != '.' && chars[i] != with && chars.get(i + 1).is_some_and(|c| *c != '.')
            })
            .collect();
        let i = candidates[at.index(candidates.len())];
        let mut changed = chars;
        changed[i] = with;
        let changed: String = changed.into_iter().collect();
        prop_assert!(a.authenticate(&changed).is_err(), "accepted {changed:?} (from {token:?})");
    }
}

// ---------------------------------------------------------------------------------------
// Over HTTP
// ---------------------------------------------------------------------------------------

/// One random request.
#[derive(Debug, Clone)]
struct Case {
    path: &'static str,
    query: Option<String>,
    last_event_id: Option<Vec<u8>>,
    authorization: Option<Vec<u8>>,
    wire: Wire,
}

/// How the request is put on the wire.
#[derive(Debug, Clone, Default)]
struct Wire {
    /// `HTTP/1.0` instead of `HTTP/1.1`.
    http10: bool,
    /// Header names in lower case.
    lower_names: bool,
    /// Where the head is cut in two writes, if it is.
    split: Option<prop::sample::Index>,
}

fn wire() -> impl Strategy<Value = Wire> {
    (
        prop::bool::weighted(0.2),
        any::<bool>(),
        prop::option::of(any::<prop::sample::Index>()),
    )
        .prop_map(|(http10, lower_names, split)| Wire {
            http10,
            lower_names,
            split,
        })
}

/// Characters a query may carry unencoded in a request line.
const QUERY_CHARS: &str = "[A-Za-z0-9%&=.,:()_~!$'*+;@/?-]{0,200}";

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[ -~]{0,60}".prop_map(String::into_bytes),
        "[0-9]{1,22}\\.[0-9]{1,12}".prop_map(String::into_bytes),
        prop::collection::vec(0x80u8..=0xff, 1..20),
        ("[ -~]{0,10}", prop::collection::vec(0x80u8..=0xff, 1..8)).prop_map(|(a, b)| {
            let mut v = a.into_bytes();
            v.extend(b);
            v
        }),
    ]
}

fn http_case(valid_token: String) -> impl Strategy<Value = Case> {
    let query = prop::option::of(prop_oneof![
        valid_query().prop_map(|(q, _)| q),
        near_query().prop_map(|q| {
            // Keep it a legal request target: encode what the request line cannot carry.
            q.bytes()
                .map(|b| {
                    if b.is_ascii_graphic() && !b"\"\\{}|^`<>#".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect()
        }),
        QUERY_CHARS,
    ]);
    let token = valid_token.clone();
    let authorization = prop::option::of(prop_oneof![
        Just(format!("Bearer {token}").into_bytes()),
        header_value(),
        header_value().prop_map(|v| {
            let mut b = b"Bearer ".to_vec();
            b.extend(v);
            b
        }),
        token_like().prop_map(|t| format!("Bearer {t}").into_bytes()),
    ]);
    let random = (
        prop::sample::select(vec!["/v1/stream", "/v1/stream", "/v1/position"]),
        query,
        prop::option::of(header_value()),
        authorization,
    )
        .prop_map(|(path, query, last_event_id, authorization)| Case {
            path,
            query,
            last_event_id,
            authorization,
            wire: Wire::default(),
        });
    // Requests that should stream, so that both outcomes are exercised.
    let sane = (
        prop::sample::select(vec![
            "",
            "tables=notes",
            "tables=public.notes&ops=insert,delete",
            "payload=keys",
            "filter=notes:body=eq.x",
            "filter=notes:id=in.(1,2)&filter=notes:secret=is.null",
            "last_event_id=0.0",
        ]),
        prop::option::of(Just(b"0.0".to_vec())),
    )
        .prop_map(move |(query, last_event_id)| Case {
            path: "/v1/stream",
            query: Some(query.to_string()),
            last_event_id,
            authorization: Some(format!("Bearer {valid_token}").into_bytes()),
            wire: Wire::default(),
        });
    (prop_oneof![3 => random, 1 => sane], wire()).prop_map(|(case, wire)| Case { wire, ..case })
}

/// Header values are sent as raw bytes; leading and trailing blanks are trimmed here
/// because HTTP does so anyway, and control bytes cannot be sent at all.
fn clean(v: &[u8]) -> Vec<u8> {
    let v: Vec<u8> = v
        .iter()
        .copied()
        .filter(|b| *b == b'\t' || *b >= 0x20 && *b != 0x7f)
        .collect();
    let start = v.iter().position(|b| *b != b' ' && *b != b'\t');
    let end = v.iter().rposition(|b| *b != b' ' && *b != b'\t');
    match (start, end) {
        (Some(s), Some(e)) => v[s..=e].to_vec(),
        _ => Vec::new(),
    }
}

/// Requests answered 200 and 4xx, to check that the cases reach both.
static ACCEPTED: AtomicUsize = AtomicUsize::new(0);
static REFUSED: AtomicUsize = AtomicUsize::new(0);

/// Sends `case` and checks the answer: a stream, a 200 JSON document or a 4xx JSON error.
async fn check(addr: SocketAddr, case: Case) -> Result<(), TestCaseError> {
    let mut head = format!("GET {}", case.path).into_bytes();
    if let Some(q) = &case.query {
        head.push(b'?');
        head.extend(q.as_bytes());
    }
    let version = if case.wire.http10 { "1.0" } else { "1.1" };
    head.extend(format!(" HTTP/{version}\r\nHost: {addr}\r\nConnection: close\r\n").as_bytes());
    for (name, value) in [
        ("Last-Event-ID", &case.last_event_id),
        ("Authorization", &case.authorization),
    ] {
        if let Some(v) = value {
            let name = if case.wire.lower_names {
                name.to_ascii_lowercase()
            } else {
                name.to_string()
            };
            head.extend(format!("{name}: ").as_bytes());
            head.extend(clean(v));
            head.extend(b"\r\n");
        }
    }
    head.extend(b"\r\n");
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        conn.set_nodelay(true)?;
        match &case.wire.split {
            Some(at) => {
                let (a, b) = head.split_at(at.index(head.len()));
                conn.write_all(a).await?;
                conn.flush().await?;
                tokio::task::yield_now().await;
                conn.write_all(b).await?;
            }
            None => conn.write_all(&head).await?,
        }
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if conn.read_buf(&mut buf).await? == 0 {
                return Err(std::io::Error::other(format!(
                    "closed before a response head: {:?}",
                    String::from_utf8_lossy(&buf)
                )));
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers: Vec<(String, String)> = head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let content_type = headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.clone());
        if status == 200 && content_type.as_deref() == Some("text/event-stream") {
            // A stream: it started, which is all this test asks; closing it is fine.
            return Ok((status, headers, String::new()));
        }
        let length: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no content-length: {head}")))?;
        let mut body = buf[end + 4..].to_vec();
        while body.len() < length {
            if conn.read_buf(&mut body).await? == 0 {
                break;
            }
        }
        Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
    };
    let (status, headers, body) = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| TestCaseError::fail("no response within 10 s"))?
        .map_err(|e| TestCaseError::fail(format!("exchange failed: {e}")))?;
    let content_type = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str());
    if status == 200 {
        ACCEPTED.fetch_add(1, Ordering::Relaxed);
        if content_type == Some("text/event-stream") {
            prop_assert_eq!(case.path, "/v1/stream");
        } else {
            prop_assert_eq!(case.path, "/v1/position");
            let doc: Value = serde_json::from_str(&body)
                .map_err(|e| TestCaseError::fail(format!("200 body is not JSON ({e}): {body}")))?;
            prop_assert!(doc["position"].is_string(), "{}", body);
        }
        return Ok(());
    }
    REFUSED.fetch_add(1, Ordering::Relaxed);
    prop_assert!(
        (400..500).contains(&status),
        "status {} (want 200 or 4xx), body {}",
        status,
        body
    );
    prop_assert_eq!(
        content_type,
        Some("application/json"),
        "status {} body {}",
        status,
        body
    );
    let doc: Value = serde_json::from_str(&body)
        .map_err(|e| TestCaseError::fail(format!("error body is not JSON ({e}): {body}")))?;
    let error = doc["error"].as_object();
    prop_assert!(
        error.is_some_and(|e| e.len() == 2
            && e["code"].as_str().is_some_and(|c| !c.is_empty())
            && e["message"].as_str().is_some_and(|m| !m.is_empty())),
        "not the error shape: {}",
        body
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_requests_get_a_stream_or_a_4xx_json_error() {
    let db = TestDb::new().await;
    support::tenant_table(&db, "notes").await;
    let mut sources = support::sources(&db);
    // Many streams are opened and dropped at once: keep the admission limits out of the
    // way, except that a 429 would be a fine answer too.
    sources
        .env
        .push(("PGFEED_AUTH_TABLES_CLAIM".into(), "tables".into()));
    sources
        .env
        .push(("PGFEED_AUTH_TABLES_CLAIM_OPTIONAL".into(), "true".into()));
    let gw = Gateway::start_with(sources).await;
    let addr = gw.addr;
    let strategy = http_case(gw.token("acme"));
    let handle = tokio::runtime::Handle::current();
    let result = tokio::task::block_in_place(|| {
        let mut runner = TestRunner::new(RunnerConfig {
            cases: 200,
            failure_persistence: None,
            max_shrink_iters: 200,
            ..RunnerConfig::default()
        });
        runner
            .run(&strategy, |case| handle.block_on(check(addr, case)))
            .map_err(|e| e.to_string())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let (accepted, refused) = (
        ACCEPTED.load(Ordering::Relaxed),
        REFUSED.load(Ordering::Relaxed),
    );
    assert!(
        accepted >= 10 && refused >= 10,
        "the cases should reach both outcomes: {accepted} accepted, {refused} refused"
    );
    // The gateway is still healthy afterwards.
    let r = support::get(addr, "/healthz", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Row filters against PostgreSQL's own comparison
// ---------------------------------------------------------------------------------------

/// A plain decimal as `numeric` prints it: sign, up to 25 integer digits, up to 25 decimals.
fn plain_decimal() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        "[0-9]{1,25}",
        prop::option::of("[0-9]{1,25}"),
    )
        .prop_map(|(neg, int, frac)| {
            let sign = if neg { "-" } else { "" };
            match frac {
                Some(f) => format!("{sign}{int}.{f}"),
                None => format!("{sign}{int}"),
            }
        })
}

/// `value` (a plain decimal) spelled another way PostgreSQL reads as the same number.
fn respell(value: &str, how: u8) -> String {
    let (sign, body) = match value.strip_prefix('-') {
        Some(b) => ("-", b),
        None => ("", value),
    };
    match how % 5 {
        0 if body.contains('.') => format!("{value}000"),
        0 => format!("{value}.0"),
        1 if sign.is_empty() => format!("+{value}"),
        1 | 2 => format!("{sign}000{body}"),
        3 => {
            let (int, frac) = body.split_once('.').unwrap_or((body, ""));
            format!("{sign}{int}{frac}e-{}", frac.len())
        }
        _ => {
            let (int, frac) = body.split_once('.').unwrap_or((body, ""));
            format!("{sign}0.{int}{frac}E+{}", int.len())
        }
    }
}

/// A column value (its SQL type's text, and whether it is a bigint) and a literal: often
/// the same number spelled otherwise, or a neighbour (2^53 and around, one digit more).
fn number_case() -> impl Strategy<Value = (String, bool, String)> {
    let big = prop_oneof![
        any::<i64>(),
        9_007_199_254_740_982i64..9_007_199_254_741_002,
        -9_007_199_254_741_002i64..-9_007_199_254_740_982,
        Just(i64::MAX),
        Just(i64::MIN),
        -3i64..3,
    ]
    .prop_map(|v| (v.to_string(), true));
    let numeric = plain_decimal().prop_map(|v| (v, false));
    (
        prop_oneof![big, numeric],
        plain_decimal(),
        any::<u8>(),
        -2i64..=2,
        0u8..4,
    )
        .prop_map(|((value, is_big), other, how, delta, pick)| {
            let literal = match pick {
                0 => other,
                1 => respell(&value, how),
                2 => match value.parse::<i128>() {
                    Ok(v) => respell(&(v + i128::from(delta)).to_string(), how),
                    Err(_) => format!("{value}{}", how % 10),
                },
                _ => format!(
                    "{value}{}",
                    if value.contains('.') {
                        "0000001"
                    } else {
                        ".0000001"
                    }
                ),
            };
            (value, is_big, literal)
        })
}

/// Row filters compare numbers as PostgreSQL compares the same values: the column's
/// value as `to_jsonb` renders it (a bigint, a long numeric) against the literal read as
/// `numeric`. A float comparison matched id 9007199254740992 with `eq.9007199254740993`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn number_filters_agree_with_postgresql() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let handle = tokio::runtime::Handle::current();
    let checked = AtomicUsize::new(0);
    let result = tokio::task::block_in_place(|| {
        let mut runner = TestRunner::new(RunnerConfig {
            cases: 64,
            failure_persistence: None,
            max_shrink_iters: 100,
            ..RunnerConfig::default()
        });
        runner
            .run(&prop::collection::vec(number_case(), 64), |cases| {
                let values: Vec<&str> = cases.iter().map(|(v, _, _)| v.as_str()).collect();
                let bigs: Vec<bool> = cases.iter().map(|(_, b, _)| *b).collect();
                let literals: Vec<&str> = cases.iter().map(|(_, _, l)| l.as_str()).collect();
                let rows = handle
                    .block_on(client.query(
                        "SELECT CASE WHEN big THEN to_jsonb(a::bigint) ELSE to_jsonb(a::numeric) END::text,
                                CASE WHEN big THEN a::bigint < b::numeric ELSE a::numeric < b::numeric END,
                                CASE WHEN big THEN a::bigint = b::numeric ELSE a::numeric = b::numeric END,
                                CASE WHEN big THEN a::bigint > b::numeric ELSE a::numeric > b::numeric END
                         FROM unnest($1::text[], $2::bool[], $3::text[]) WITH ORDINALITY AS x(a, big, b, i)
                         ORDER BY i",
                        &[&values, &bigs, &literals],
                    ))
                    .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
                for ((value, _, literal), row) in cases.iter().zip(&rows) {
                    let rendered: String = row.get(0);
                    let (lt, eq, gt): (bool, bool, bool) = (row.get(1), row.get(2), row.get(3));
                    let image = Row::parse(&format!(r#"{{"c": {rendered}}}"#)).unwrap();
                    let judge = |op: &str| {
                        format!("t:c={op}.{literal}")
                            .parse::<RowFilter>()
                            .unwrap()
                            .matches(&image)
                    };
                    let ours = [
                        judge("lt"), judge("eq"), judge("gt"),
                        judge("lte"), judge("gte"), judge("neq"),
                        format!("t:c=in.(x,{literal})").parse::<RowFilter>().unwrap().matches(&image),
                    ];
                    let theirs = [lt, eq, gt, lt || eq, gt || eq, !eq, eq];
                    prop_assert_eq!(
                        ours, theirs,
                        "value {} rendered {} against literal {}", value, rendered, literal
                    );
                    checked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
            .map_err(|e| e.to_string())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(checked.load(Ordering::Relaxed) >= 64 * 64);
}
