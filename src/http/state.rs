//! [`AppState`]: what every request handler shares, built once by [`crate::serve`].

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::connections::Connections;
use crate::auth::Authenticator;
use crate::catalog::Catalog;
use crate::hub::Hub;
use crate::journal::Journal;
use crate::listener::Readiness;
use crate::metrics::Metrics;
use crate::session::StreamSettings;

/// What every request handler shares.
pub struct AppState {
    /// Live changes by tenant.
    pub hub: Arc<Hub>,
    /// Replay and head position.
    pub journal: Journal,
    /// Token verification.
    pub auth: Authenticator,
    /// Whether `tenant=` is accepted (`auth.mode = "none"`).
    pub tenant_param: bool,
    /// Watched tables and their columns.
    pub catalog: Arc<Catalog>,
    /// Origins allowed by CORS (`"*"` for any).
    pub cors_origins: Vec<String>,
    /// What `/metrics` reports.
    pub metrics: Arc<Metrics>,
    /// Listener state for `/readyz`.
    pub readiness: Arc<Readiness>,
    /// Heartbeat and retry.
    pub stream: StreamSettings,
    /// Ends streams on shutdown.
    pub shutdown: CancellationToken,
    /// Open connections, their cap and deadlines.
    pub connections: Arc<Connections>,
    /// `server.tls_cert_file` and `server.tls_key_file`, loaded: when set, every
    /// connection is TLS.
    pub tls: Option<Arc<super::Tls>>,
    /// `server.h2c`: cleartext connections may speak HTTP/2 with prior knowledge.
    pub h2c: bool,
}
