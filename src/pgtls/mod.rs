//! TLS to PostgreSQL: reads libpq's `sslmode` and `sslrootcert` out of `database.url`
//! and builds the rustls connector every connection uses (the pool, the listener, the
//! CLI, the demo, the benchmark).
//!
//! tokio-postgres parses `sslmode` `disable`, `prefer` and `require` only, and verifies
//! nothing itself: that is the connector's job. So both parameters are taken out of the
//! URL here, before the driver parses the rest, and turned into a certificate verifier
//! that does what libpq does for each mode. This module opens no connection and never
//! puts the URL (which may hold a password) in an error.

#[cfg(test)]
mod tests;
mod url;
mod verify;

use std::path::PathBuf;

pub use tokio_postgres_rustls::MakeRustlsConnect;
pub(crate) use url::split;
pub use verify::connector;

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
