//! TLS on the listener (`server.tls_cert_file`, `server.tls_key_file`): loading the PEM
//! certificate chain and key into a rustls configuration that offers HTTP/2 and HTTP/1.1
//! by ALPN, reloading it when either file changes, and a connection's handshake.
//!
//! The pair is read once at start-up, where a missing or unusable file stops the gateway
//! with a configuration error naming the key. Afterwards both files' modification times
//! are checked every [`RELOAD_INTERVAL`]: when either changed, the pair is read again and,
//! if it loads, new connections use it (open ones keep theirs); if it does not, the error
//! is logged and the previous pair kept until the files change again.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, TlsFiles};
use crate::rawconn::Prefixed;

use super::state::AppState;

/// How often the certificate and key files are checked for a change.
pub(crate) const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// The ALPN protocols offered, most preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The listener's TLS configuration, reloaded when its files change.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Current>,
}

struct Current {
    acceptor: TlsAcceptor,
    /// The files' modification times when they were last read (loaded or not).
    stamp: Stamp,
}

type Stamp = (Option<SystemTime>, Option<SystemTime>);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Reads the pair named by `files`; an error names the key of the file at fault.
    pub fn load(files: &TlsFiles) -> Result<Arc<Tls>, ConfigError> {
        let stamp = stamp(files);
        let config = server_config(files)?;
        Ok(Arc::new(Tls {
            files: files.clone(),
            current: RwLock::new(Current {
                acceptor: TlsAcceptor::from(config),
                stamp,
            }),
        }))
    }

    /// What new connections are handshaken with.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .acceptor
            .clone()
    }

    /// Reads the pair again if either file changed since it was last read. Returns
    /// whether a new pair is now in use.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.files);
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if current.stamp == now {
                return false;
            }
        }
        let loaded = server_config(&self.files);
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        // Times read before the files: a write that lands while they are read changes
        // them again, so it is picked up at the next check.
        current.stamp = now;
        match loaded {
            Ok(config) => {
                current.acceptor = TlsAcceptor::from(config);
                tracing::info!(
                    cert_file = %self.files.cert_file.display(),
                    "TLS certificate reloaded; new connections use it"
                );
                true
            }
            Err(err) => {
                tracing::error!(
                    error = %err,
                    "the changed TLS certificate or key does not load; keeping the previous pair"
                );
                false
            }
        }
    }

    /// Checks the files every [`RELOAD_INTERVAL`] until `shutdown`.
    pub(crate) async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RELOAD_INTERVAL) => {}
            }
            let tls = Arc::clone(&self);
            // File reads block; they are short, but not on a runtime thread.
            let _ = tokio::task::spawn_blocking(move || tls.reload_if_changed()).await;
        }
    }
}

/// Both files' modification times.
fn stamp(files: &TlsFiles) -> Stamp {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (modified(&files.cert_file), modified(&files.key_file))
}

fn config_err(key: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { key, message }
}

/// The rustls configuration for the pair: TLS 1.2 and 1.3 with the ring provider, ALPN
/// `h2` and `http/1.1`.
fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, ConfigError> {
    let (cert_path, key_path) = (&files.cert_file, &files.key_file);
    let cert_pem = std::fs::read(cert_path).map_err(|e| {
        config_err(
            "server.tls_cert_file",
            format!("cannot read {}: {e}", cert_path.display()),
        )
    })?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            config_err(
                "server.tls_cert_file",
                format!("{} is not valid PEM: {e}", cert_path.display()),
            )
        })?;
    if chain.is_empty() {
        return Err(config_err(
            "server.tls_cert_file",
            format!(
                "{} holds no certificate (a PEM `-----BEGIN CERTIFICATE-----` block)",
                cert_path.display()
            ),
        ));
    }
    let key_pem = std::fs::read(key_path).map_err(|e| {
        config_err(
            "server.tls_key_file",
            format!("cannot read {}: {e}", key_path.display()),
        )
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        config_err(
            "server.tls_key_file",
            format!(
                "{} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                key_path.display()
            ),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_err("server.tls_cert_file", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            config_err(
                "server.tls_key_file",
                format!(
                    "{} cannot be used with the certificate in {}: {e}",
                    key_path.display(),
                    cert_path.display()
                ),
            )
        })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A connection after its TLS handshake, and whether it chose HTTP/2.
pub(crate) type Handshaken = (TlsStream<Prefixed>, bool);

/// The TLS handshake of `socket`, which must complete within `timeout`
/// (`server.header_timeout`, counted in `pgfeed_header_timeouts_total`). `None` when it
/// fails, times out or shutdown comes first.
pub(crate) async fn handshake(
    socket: TcpStream,
    acceptor: TlsAcceptor,
    state: &AppState,
    timeout: Duration,
    shutdown: &CancellationToken,
) -> Option<Handshaken> {
    let io = Prefixed::new(
        bytes::Bytes::new(),
        socket,
        state.connections.write_timeout,
        state.shutdown.clone(),
        Arc::clone(&state.metrics),
    );
    let accepted = tokio::select! {
        () = shutdown.cancelled() => return None,
        accepted = tokio::time::timeout(timeout, acceptor.accept(io)) => accepted,
    };
    match accepted {
        Ok(Ok(stream)) => {
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            Some((stream, h2))
        }
        Ok(Err(err)) => {
            tracing::debug!(cause = %err, "TLS handshake failed");
            None
        }
        Err(_) => {
            state.metrics.header_timeouts.inc();
            None
        }
    }
}
