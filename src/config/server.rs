//! `[server]`: the listening socket, streams' timing, and the limits on subscribers and
//! connections.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::value::{address, duration, nonzero, within};
use super::{ConfigError, invalid};

/// The `[server]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// `server.listen`: the address and port to listen on: `IP:PORT`, `[IPv6]:PORT`,
    /// `HOST:PORT` (resolved at start-up) or `:PORT` (every IPv4 interface).
    #[serde(deserialize_with = "address")]
    pub listen: SocketAddr,
    /// `server.heartbeat`: comment line sent on idle streams so that proxies keep them
    /// open and clients notice a dead connection.
    #[serde(deserialize_with = "duration")]
    pub heartbeat: Duration,
    /// `server.shutdown_grace`: how long shutdown waits for streams to end.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// `server.retry`: the reconnect delay sent to EventSource clients.
    #[serde(deserialize_with = "duration")]
    pub retry: Duration,
    /// `server.live_buffer`: events buffered per tenant for live delivery; a subscriber
    /// further behind is caught up from the journal. Each tenant with streams
    /// preallocates this many slots (about 32 bytes each).
    pub live_buffer: usize,
    /// `server.replay_memory`: about how many bytes of the most recent changes are kept
    /// in memory, so that a stream that fell behind its live buffer is caught up without
    /// a journal query; 0 turns it off. Client resumes read the journal.
    pub replay_memory: usize,
    /// `server.max_subscribers`: open streams at most; more get 503.
    pub max_subscribers: usize,
    /// `server.max_subscribers_per_tenant`: open streams per tenant at most; more get 429.
    pub max_subscribers_per_tenant: usize,
    /// `server.max_stream_rate`: new streams per tenant per second (bursts of twice
    /// that); more get 429.
    pub max_stream_rate: u32,
    /// `server.threads` (default: half the CPUs, at least 1): the runtime's worker
    /// threads. pgfeed usually shares its machine with PostgreSQL or the application,
    /// and a commit holds PostgreSQL's serialized NOTIFY section while it waits for a
    /// CPU: on 2 cores, one thread delivered about a quarter more than two
    /// (BENCHMARKS.md). On a machine of its own, set it to the number of CPUs.
    pub threads: usize,
    /// `server.max_connections`: open connections at most (streams and everything
    /// else). Beyond it a request gets a JSON 503 `too_many_connections`, while
    /// `/healthz` and `/readyz` are still answered. Lowered at start-up if the open-file
    /// limit cannot hold it.
    pub max_connections: usize,
    /// `server.header_timeout`: how long a client may take to send its whole request
    /// head, however slowly it trickles; then it gets 408 and is closed.
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// `server.write_timeout`: a stream whose client accepts no bytes for this long is
    /// closed (`pgfeed_write_timeouts_total`).
    #[serde(deserialize_with = "duration")]
    pub write_timeout: Duration,
    /// `server.tls_cert_file` (default none; with `server.tls_key_file`, both or
    /// neither): the PEM certificate chain, the server's first, that the listener serves
    /// TLS with (HTTP/2 and HTTP/1.1 by ALPN); reloaded when it changes.
    pub tls_cert_file: Option<PathBuf>,
    /// `server.tls_key_file`: the certificate's PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub tls_key_file: Option<PathBuf>,
    /// `server.h2c`: cleartext connections may also speak HTTP/2 with prior knowledge
    /// (h2c), besides HTTP/1.1.
    pub h2c: bool,
}

/// The listener's certificate and key files (`server.tls_cert_file`,
/// `server.tls_key_file`), read when the gateway starts (`crate::http::Tls`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The PEM certificate chain, the server's certificate first.
    pub cert_file: PathBuf,
    /// The PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            heartbeat: Duration::from_secs(15),
            shutdown_grace: Duration::from_secs(10),
            retry: Duration::from_secs(2),
            live_buffer: 256,
            replay_memory: 16 << 20,
            max_subscribers: 10_000,
            max_subscribers_per_tenant: 1000,
            max_stream_rate: 50,
            threads: std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            max_connections: 11_000,
            header_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            tls_cert_file: None,
            tls_key_file: None,
            h2c: false,
        }
    }
}

impl ServerConfig {
    /// The certificate and key when TLS is configured (both set: [`Self::validate`]
    /// refuses one without the other).
    pub fn tls(&self) -> Option<TlsFiles> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert_file), Some(key_file)) => Some(TlsFiles {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
            }),
            _ => None,
        }
    }

    /// The section's rules; each problem is collected in `errs`.
    pub fn validate(&self, errs: &mut Vec<ConfigError>) {
        const MILLIONS: usize = 10_000_000;
        nonzero(errs, "server.heartbeat", self.heartbeat);
        nonzero(errs, "server.retry", self.retry);
        nonzero(errs, "server.header_timeout", self.header_timeout);
        nonzero(errs, "server.write_timeout", self.write_timeout);
        within(errs, "server.live_buffer", self.live_buffer, 1, 1 << 20);
        within(errs, "server.replay_memory", self.replay_memory, 0, 1 << 40);
        within(
            errs,
            "server.max_subscribers",
            self.max_subscribers,
            1,
            MILLIONS,
        );
        within(
            errs,
            "server.max_subscribers_per_tenant",
            self.max_subscribers_per_tenant,
            1,
            MILLIONS,
        );
        within(
            errs,
            "server.max_stream_rate",
            self.max_stream_rate as usize,
            1,
            1_000_000,
        );
        within(errs, "server.threads", self.threads, 1, 1024);
        for (key, value) in [
            ("server.tls_cert_file", &self.tls_cert_file),
            ("server.tls_key_file", &self.tls_key_file),
        ] {
            if value.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                errs.push(invalid(key, "must not be empty when set"));
            }
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => errs.push(invalid(
                "server.tls_key_file",
                "is required with server.tls_cert_file: TLS needs both the certificate and its private key",
            )),
            (None, Some(_)) => errs.push(invalid(
                "server.tls_cert_file",
                "is required with server.tls_key_file: TLS needs both the certificate and its private key",
            )),
            _ => {}
        }
        within(
            errs,
            "server.max_connections",
            self.max_connections,
            1,
            MILLIONS,
        );
    }
}
