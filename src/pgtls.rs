//! TLS to PostgreSQL: reads libpq's `sslmode` and `sslrootcert` out of `database.url`
//! and builds the rustls connector every connection uses (the pool, the listener, the
//! CLI, the demo, the benchmark).
//!
//! tokio-postgres parses `sslmode` `disable`, `prefer` and `require` only, and verifies
//! nothing itself: that is the connector's job. So both parameters are taken out of the
//! URL here, before the driver parses the rest, and turned into a certificate verifier
//! that does what libpq does for each mode. This module opens no connection and never
//! puts the URL (which may hold a password) in an error.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
pub use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`, the values pgfeed supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain connections only.
    Disable,
    /// TLS if the server offers it, plain otherwise (libpq's default, and ours).
    Prefer,
    /// TLS or no connection; the certificate is not verified (unless `sslrootcert` is
    /// given: then as `verify-ca`, like libpq).
    Require,
    /// TLS, the server's certificate chain verified; its host name is not.
    VerifyCa,
    /// TLS, the chain verified and the certificate valid for the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, TlsError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(TlsError::Invalid {
                    parameter: "sslmode",
                    reason: format!(
                        "unsupported value `{}`; use disable, prefer, require, verify-ca or \
                         verify-full",
                        other.escape_debug()
                    ),
                });
            }
        })
    }

    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What the driver is told: it only knows whether TLS is skipped, tried or required.
    fn driver(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Driver;
        match self {
            SslMode::Disable => Driver::Disable,
            SslMode::Prefer => Driver::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Driver::Require,
        }
    }
}

/// A TLS parameter of `database.url` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A value is not one pgfeed (or libpq) accepts.
    #[error("{parameter}: {reason}")]
    Invalid {
        /// `sslmode` or `sslrootcert`.
        parameter: &'static str,
        /// Why, naming the accepted values.
        reason: String,
    },
    /// The `sslrootcert` file could not be read or holds no certificate.
    #[error("sslrootcert: cannot use `{}`: {reason}", path.display())]
    RootCert {
        /// The file named.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Verification needs trusted roots and the system has none.
    #[error(
        "sslmode={mode}: no trusted root certificates found on this system (install the \
         ca-certificates package, or name the server's CA with sslrootcert=FILE)"
    )]
    NoSystemRoots {
        /// The mode that needed them.
        mode: &'static str,
    },
}

/// The URL without the TLS parameters, and what they asked for.
pub(crate) struct Split {
    /// `database.url` less `sslmode` and `sslrootcert`, for tokio-postgres to parse.
    pub(crate) rest: String,
    /// `sslmode`, if given.
    pub(crate) sslmode: Option<String>,
    /// `sslrootcert`, if given.
    pub(crate) sslrootcert: Option<String>,
}

/// Takes `sslmode` and `sslrootcert` out of a connection string, URL
/// (`postgres://...?sslmode=...`) or key/value (`host=... sslmode=...`) as libpq reads
/// both, leaving every other byte as it was.
pub(crate) fn split(url: &str) -> Result<Split, TlsError> {
    let mut out = Split {
        rest: String::new(),
        sslmode: None,
        sslrootcert: None,
    };
    let mut take = |key: &str, value: String| match key {
        "sslmode" => {
            out.sslmode = Some(value);
            true
        }
        "sslrootcert" => {
            out.sslrootcert = Some(value);
            true
        }
        _ => false,
    };
    let rest = match ["postgres://", "postgresql://"]
        .iter()
        .find(|prefix| url.starts_with(*prefix))
    {
        Some(_) => split_url(url, &mut take)?,
        None => split_key_values(url, &mut take)?,
    };
    out.rest = rest;
    Ok(out)
}

/// The URL form: parameters follow the first `?` after the credentials (tokio-postgres
/// takes everything up to the first `@` as credentials), `&`-separated, percent-encoded.
fn split_url(url: &str, take: &mut impl FnMut(&str, String) -> bool) -> Result<String, TlsError> {
    let after_credentials = url.find('@').map_or(0, |at| at + 1);
    let Some(q) = url[after_credentials..]
        .find('?')
        .map(|i| i + after_credentials)
    else {
        return Ok(url.to_string());
    };
    let mut kept: Vec<&str> = Vec::new();
    for pair in url[q + 1..].split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = match percent_decode(key).as_slice() {
            b"sslmode" => "sslmode",
            b"sslrootcert" => "sslrootcert",
            _ => {
                kept.push(pair);
                continue;
            }
        };
        let value = String::from_utf8(percent_decode(value)).map_err(|_| TlsError::Invalid {
            parameter: name,
            reason: "the value is not valid UTF-8 once percent-decoded".into(),
        })?;
        take(name, value);
    }
    let mut rest = url[..q].to_string();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok(rest)
}

fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// The key/value form: `key = value` pairs separated by white space, a value either
/// single-quoted or bare, `\` escaping the next character in both (libpq's rules, as
/// tokio-postgres implements them). Pairs this module takes are cut out whole.
fn split_key_values(
    s: &str,
    take: &mut impl FnMut(&str, String) -> bool,
) -> Result<String, TlsError> {
    let mut rest = String::with_capacity(s.len());
    let mut it = s.char_indices().peekable();
    let mut kept_from = 0;
    loop {
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = it.peek() else { break };
        let mut end = start;
        while let Some((i, c)) = it.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            end = i + c.len_utf8();
        }
        let key = &s[start..end];
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if it.next_if(|(_, c)| *c == '=').is_none() {
            // Malformed: leave it to the driver, which says where.
            return Ok(s.to_string());
        }
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = it.next_if(|(_, c)| *c == '\'').is_some();
        let mut closed = !quoted;
        while let Some(&(_, c)) = it.peek() {
            if quoted && c == '\'' {
                it.next();
                closed = true;
                break;
            }
            if !quoted && c.is_whitespace() {
                break;
            }
            it.next();
            if c == '\\' {
                if let Some((_, escaped)) = it.next() {
                    value.push(escaped);
                }
            } else {
                value.push(c);
            }
        }
        if !closed {
            return Ok(s.to_string());
        }
        let pair_end = it.peek().map_or(s.len(), |&(i, _)| i);
        if take(key, value) {
            rest.push_str(&s[kept_from..start]);
            kept_from = pair_end;
        }
    }
    rest.push_str(&s[kept_from..]);
    Ok(rest)
}

/// The connector for `sslmode` and `sslrootcert` as given (`None`: not in the URL), and
/// the mode in force. Reads `sslrootcert` (and the system's roots when verifying without
/// it) now, so that a missing file is reported at start-up rather than at each connect.
pub fn connector(
    sslmode: Option<&str>,
    sslrootcert: Option<&str>,
) -> Result<(SslMode, MakeRustlsConnect), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let system = sslrootcert == Some("system");
    let mode = match sslmode {
        Some(value) => SslMode::parse(value)?,
        // libpq: `sslrootcert=system` makes the default `verify-full`.
        None if system => SslMode::VerifyFull,
        None => SslMode::Prefer,
    };
    if system && mode != SslMode::VerifyFull {
        return Err(TlsError::Invalid {
            parameter: "sslmode",
            reason: format!(
                "weak sslmode `{}` may not be used with sslrootcert=system (use verify-full)",
                mode.as_str()
            ),
        });
    }
    if sslrootcert == Some("") {
        return Err(TlsError::Invalid {
            parameter: "sslrootcert",
            reason: "empty; name a PEM file of CA certificates, or `system`".into(),
        });
    }
    let roots = match (mode, sslrootcert) {
        (SslMode::Disable, _) => None,
        (_, Some(path)) if !system => Some(read_roots(path)?),
        (SslMode::VerifyCa | SslMode::VerifyFull, _) => Some(system_roots(mode)?),
        // `prefer` and `require` without a CA: encrypted, not authenticated (libpq's
        // behaviour; only the verify modes protect against an impostor).
        _ => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
        (SslMode::VerifyFull, Some(roots)) => {
            rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::clone(&provider),
            )
            .build()
            .map_err(|err| TlsError::Invalid {
                parameter: "sslrootcert",
                reason: err.to_string(),
            })?
        }
        (_, roots) => Arc::new(ChainOnly {
            roots: roots.map(Arc::new),
            algorithms: provider.signature_verification_algorithms,
        }),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| TlsError::Invalid {
            parameter: "sslmode",
            reason: err.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok((mode, MakeRustlsConnect::new(config)))
}

/// What an operator should know about a failed connection, when the certificate check
/// refused the server: rustls's words (`UnknownIssuer`) do not say which CAs were tried.
pub fn explain(err: &tokio_postgres::Error, sslrootcert: Option<&str>) -> Option<String> {
    use rustls::{CertificateError, Error};
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let refusal = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<Error>());
        if let Some(Error::InvalidCertificate(CertificateError::UnknownIssuer)) = refusal {
            return Some(match sslrootcert {
                Some(path) if path != "system" => {
                    format!(
                        "the server's certificate is not signed by a CA in sslrootcert (`{path}`)"
                    )
                }
                _ => "the server's certificate is not signed by a CA this system trusts (name \
                      the server's CA with sslrootcert=FILE)"
                    .into(),
            });
        }
        source = cause.source();
    }
    None
}

/// The driver's `sslmode` for `mode`, except over Unix sockets, where libpq never uses
/// TLS (PostgreSQL refuses it there), whatever the mode.
pub(crate) fn apply(mode: SslMode, config: &mut tokio_postgres::Config) {
    use tokio_postgres::config::Host;
    let hosts = config.get_hosts();
    let no_hosts = hosts.is_empty();
    let unix_only = !no_hosts && hosts.iter().all(|h| matches!(h, Host::Unix(_)));
    if unix_only {
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        return;
    }
    config.ssl_mode(mode.driver());
    // With `hostaddr` and no `host`, the driver would have no name for the handshake and
    // refuse TLS: use the address, as libpq does.
    if no_hosts {
        let addrs: Vec<String> = config
            .get_hostaddrs()
            .iter()
            .map(|a| a.to_string())
            .collect();
        for addr in addrs {
            config.host(&addr);
        }
    }
}

fn read_roots(path: &str) -> Result<RootCertStore, TlsError> {
    let fail = |reason: String| TlsError::RootCert {
        path: PathBuf::from(path),
        reason,
    };
    let pem = std::fs::read(path).map_err(|err| fail(err.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|err| fail(format!("not a PEM certificate file ({err})")))?;
        roots
            .add(cert)
            .map_err(|err| fail(format!("unusable CA certificate ({err})")))?;
    }
    if roots.is_empty() {
        return Err(fail("no PEM certificate in it".into()));
    }
    Ok(roots)
}

fn system_roots(mode: SslMode) -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    for err in &found.errors {
        tracing::debug!(cause = %err, "skipping a system root certificate");
    }
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(TlsError::NoSystemRoots {
            mode: mode.as_str(),
        });
    }
    Ok(roots)
}

/// `verify-ca`, and `prefer`/`require` with or without a CA: the chain is checked against
/// `roots` when there are any, the host name never. The handshake's signatures are
/// always checked (they prove the server holds the certificate's key).
#[derive(Debug)]
struct ChainOnly {
    /// `None`: the certificate is not verified at all (`prefer`/`require` without CA).
    roots: Option<Arc<RootCertStore>>,
    /// The crypto provider's signature algorithms.
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
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
            parts(
                "postgres://u:p@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fca.pem"
            ),
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
}
