//! The rustls connector for a mode: the roots (a file or the system's) and the verifier
//! that checks the chain without the host name (`verify-ca`).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{SslMode, TlsError};

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
