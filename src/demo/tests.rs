//! Unit tests of the demo's addresses, origins and printed lines.

use std::net::SocketAddr;

use super::banner::redact_password;
use super::net::{default_page_addr, page_origins};

#[test]
fn passwords_are_not_echoed() {
    assert_eq!(
        redact_password("postgres://app:s3cret@db.example.com:5432/app?sslmode=require"),
        "postgres://app:***@db.example.com:5432/app?sslmode=require"
    );
    assert_eq!(
        redact_password("postgres://app@db/app"),
        "postgres://app@db/app"
    );
    assert_eq!(
        redact_password("host=db user=app password=s3cret dbname=app"),
        "host=db user=app password=*** dbname=app"
    );
}

#[test]
fn the_page_listens_next_to_the_gateway() {
    let page = |g: &str| default_page_addr(g.parse().unwrap()).to_string();
    assert_eq!(page("127.0.0.1:8080"), "127.0.0.1:8081");
    assert_eq!(page("[::1]:9000"), "[::1]:9001");
    assert_eq!(page("127.0.0.1:65535"), "127.0.0.1:0");
}

#[test]
fn the_page_origin_is_allowed_once() {
    let page: SocketAddr = "127.0.0.1:8081".parse().unwrap();
    let origins = page_origins(page, &["http://localhost:8081".to_string()]);
    assert_eq!(
        origins,
        ["http://127.0.0.1:8081", "http://[::1]:8081"].map(String::from)
    );
    let any: SocketAddr = "0.0.0.0:8081".parse().unwrap();
    assert_eq!(page_origins(any, &[]), ["*"]);
}
