//! Unit tests of row filters: grammar, exact numbers, evaluation.

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
