//! Unit tests of the TLS settings: modes, URL splitting, roots.

use super::*;

fn error(sslmode: Option<&str>, sslrootcert: Option<&str>) -> String {
    match connector(sslmode, sslrootcert) {
        Ok(_) => panic!("{sslmode:?} {sslrootcert:?} accepted"),
        Err(err) => err.to_string(),
    }
}

fn parts(url: &str) -> (String, Option<String>, Option<String>) {
    let s = split(url).unwrap();
    (s.rest, s.sslmode, s.sslrootcert)
}

#[test]
fn url_parameters_are_taken_out_and_the_rest_kept() {
    assert_eq!(
        parts("postgres://u:p@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fca.pem"),
        (
            "postgres://u:p@h:5/db?application_name=x".into(),
            Some("verify-full".into()),
            Some("/ca.pem".into())
        )
    );
    assert_eq!(
        parts("postgresql://h/db?sslmode=require"),
        ("postgresql://h/db".into(), Some("require".into()), None)
    );
    // A `?` in the password is not the query.
    assert_eq!(
        parts("postgres://u:a?sslmode=x@h/db"),
        ("postgres://u:a?sslmode=x@h/db".into(), None, None)
    );
    assert_eq!(
        parts("postgres://h/db"),
        ("postgres://h/db".into(), None, None)
    );
}

#[test]
fn key_value_parameters_are_taken_out_and_the_rest_kept() {
    assert_eq!(
        parts("host=h sslmode = verify-ca  sslrootcert='/a b/c\\'a.pem' dbname=d"),
        (
            "host=h    dbname=d".into(),
            Some("verify-ca".into()),
            Some("/a b/c'a.pem".into())
        )
    );
    assert_eq!(
        parts("host=h password='x sslmode=disable'"),
        ("host=h password='x sslmode=disable'".into(), None, None)
    );
    // Malformed strings are left whole for the driver to report.
    assert_eq!(
        parts("host=h sslmode"),
        ("host=h sslmode".into(), None, None)
    );
}

#[test]
fn unix_sockets_never_use_tls_and_a_bare_hostaddr_is_the_name() {
    use tokio_postgres::config::SslMode as Driver;
    let mut unix: tokio_postgres::Config = "host=/run/postgresql user=u".parse().unwrap();
    apply(SslMode::VerifyFull, &mut unix);
    assert_eq!(unix.get_ssl_mode(), Driver::Disable);
    let mut tcp: tokio_postgres::Config = "hostaddr=10.1.2.3 user=u".parse().unwrap();
    apply(SslMode::VerifyCa, &mut tcp);
    assert_eq!(tcp.get_ssl_mode(), Driver::Require);
    assert_eq!(
        tcp.get_hosts(),
        &[tokio_postgres::config::Host::Tcp("10.1.2.3".into())]
    );
}

#[test]
fn modes_and_their_errors() {
    assert_eq!(connector(None, None).unwrap().0, SslMode::Prefer);
    assert_eq!(
        connector(None, Some("system")).unwrap().0,
        SslMode::VerifyFull
    );
    let err = error(Some("allow"), None);
    assert!(
        err.starts_with("sslmode: unsupported value `allow`"),
        "{err}"
    );
    let err = error(Some("require"), Some("system"));
    assert!(err.contains("sslrootcert=system"), "{err}");
    let err = error(Some("verify-ca"), Some("/nonexistent/ca.pem"));
    assert!(
        err.starts_with("sslrootcert: cannot use `/nonexistent/ca.pem`"),
        "{err}"
    );
    let err = error(Some("verify-ca"), Some("Cargo.toml"));
    assert!(err.contains("no PEM certificate"), "{err}");
}
