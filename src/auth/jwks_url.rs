//! `auth.jwks_url`: a JWKS document fetched over HTTP(S) at start-up, cached per the
//! response's `Cache-Control: max-age` and refreshed by a background task, never on a
//! request's path. A token naming an unknown `kid` wakes that task for an early refetch
//! (one at a time, at most one every [`REFETCH_EVERY`]); the token itself is refused, and
//! later tokens see the refetched keys.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::jwks::{Keys, parse_jwks};

/// The shortest time a fetched document is kept, whatever its `max-age`.
pub(super) const MIN_MAX_AGE: Duration = Duration::from_secs(60);
/// The longest time a fetched document is kept, whatever its `max-age`.
pub(super) const MAX_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// How long a document without `max-age` is kept.
pub(super) const DEFAULT_MAX_AGE: Duration = Duration::from_secs(5 * 60);
/// After a failed refresh, when the next attempt is made (the old keys are kept).
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// The shortest time between two refetches caused by unknown `kid`s.
pub(super) const REFETCH_EVERY: Duration = Duration::from_secs(10);
/// A fetch (connect, TLS, request, body) that takes longer fails.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest JWKS document accepted.
const MAX_BODY: usize = 1 << 20;

/// The keys of a JWKS URL, kept fresh by a background task that ends when this is dropped.
pub(super) struct JwksUrl {
    shared: Arc<Shared>,
    _stop: DropGuard,
}

struct Shared {
    keys: RwLock<Arc<Keys>>,
    /// Wakes the refresher early: a token named an unknown `kid`.
    wake: Notify,
}

/// Where and how to fetch.
struct Target {
    uri: Uri,
    /// The URL as messages show it: no query.
    shown: String,
    host: String,
    port: u16,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl JwksUrl {
    /// Fetches `url` (which config validation checked) and starts the refresher; the
    /// error names the URL and why, for `auth.jwks_url: ...`.
    pub(super) async fn start(url: &str) -> Result<JwksUrl, String> {
        let target = Target::new(url)?;
        let (keys, max_age) = target.fetch().await?;
        tracing::info!(url = %target.shown, keys = keys.len(), max_age_s = max_age.as_secs(), "fetched the JWKS");
        let shared = Arc::new(Shared {
            keys: RwLock::new(Arc::new(keys)),
            wake: Notify::new(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(refresher(shared.clone(), target, max_age, stop.clone()));
        Ok(JwksUrl {
            shared,
            _stop: stop.drop_guard(),
        })
    }

    /// The current keys.
    pub(super) fn keys(&self) -> Arc<Keys> {
        self.shared
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Asks for an early refetch (a token named an unknown `kid`); never waits.
    pub(super) fn unknown_kid(&self) {
        self.shared.wake.notify_one();
    }
}

/// Refetches when the document's age runs out, or early when woken by an unknown `kid`
/// (at most once every [`REFETCH_EVERY`]); a failed refresh keeps the old keys.
async fn refresher(
    shared: Arc<Shared>,
    target: Target,
    mut ttl: Duration,
    stop: CancellationToken,
) {
    let mut last_early: Option<Instant> = None;
    loop {
        let early = tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(ttl) => false,
            () = shared.wake.notified() => true,
        };
        if early {
            if let Some(last) = last_early {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep_until(last + REFETCH_EVERY) => {}
                }
            }
            last_early = Some(Instant::now());
        }
        let fetched = tokio::select! {
            () = stop.cancelled() => return,
            fetched = target.fetch() => fetched,
        };
        match fetched {
            Ok((keys, max_age)) => {
                tracing::debug!(url = %target.shown, keys = keys.len(), max_age_s = max_age.as_secs(), early, "refreshed the JWKS");
                *shared.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
                ttl = max_age;
            }
            Err(err) => {
                tracing::warn!(cause = %err, retry_s = RETRY_AFTER.as_secs(), "cannot refresh the JWKS; keeping the previous keys");
                ttl = RETRY_AFTER;
            }
        }
    }
}

impl Target {
    fn new(url: &str) -> Result<Target, String> {
        let uri: Uri = url
            .parse()
            .map_err(|_| "is not a URL (expected https://host/path/jwks.json)".to_string())?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("must start with http:// or https://".into()),
        };
        let authority = uri
            .authority()
            .filter(|a| !a.host().is_empty() && !a.as_str().contains('@'))
            .ok_or("needs a host and no credentials")?;
        let shown = format!(
            "{}://{}{}",
            if https { "https" } else { "http" },
            authority,
            uri.path()
        );
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let name = ServerName::try_from(host.clone())
                .map_err(|_| format!("{shown}: {host:?} is not a host name"))?;
            Some((connector(&shown)?, name))
        } else {
            None
        };
        Ok(Target {
            uri,
            shown,
            host,
            port,
            tls,
        })
    }

    /// One bounded fetch: the keys and how long to keep them.
    async fn fetch(&self) -> Result<(Keys, Duration), String> {
        let (body, max_age) = tokio::time::timeout(FETCH_TIMEOUT, self.get())
            .await
            .map_err(|_| {
                format!(
                    "cannot fetch {}: no answer within {}s",
                    self.shown,
                    FETCH_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| format!("cannot fetch {}: {e}", self.shown))?;
        let text = std::str::from_utf8(&body)
            .map_err(|_| format!("{} is not a JWKS document: not UTF-8", self.shown))?;
        Ok((parse_jwks(text, &self.shown)?, max_age))
    }

    async fn get(&self) -> Result<(Bytes, Duration), String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| e.to_string())?;
        match &self.tls {
            None => self.exchange(tcp).await,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                self.exchange(tls).await
            }
        }
    }

    /// A GET on one HTTP/1.1 connection.
    async fn exchange<S>(&self, stream: S) -> Result<(Bytes, Duration), String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        let driver = AbortOnDrop(tokio::spawn(conn));
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        let authority = self.uri.authority().map_or("", |a| a.as_str());
        let request = Request::get(path)
            .header(header::HOST, authority)
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("pgfeed/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("answered {}", response.status()));
        }
        let max_age = max_age(response.headers().get(header::CACHE_CONTROL));
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    format!("the document is larger than {} KiB", MAX_BODY / 1024)
                } else {
                    e.to_string()
                }
            })?
            .to_bytes();
        drop(driver);
        Ok((body, max_age))
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long a response may be kept: its `max-age` within [`MIN_MAX_AGE`] and
/// [`MAX_MAX_AGE`]; `no-cache`/`no-store` mean the minimum; absent, [`DEFAULT_MAX_AGE`].
pub(super) fn max_age(value: Option<&HeaderValue>) -> Duration {
    let Some(value) = value.and_then(|v| v.to_str().ok()) else {
        return DEFAULT_MAX_AGE;
    };
    let mut age = None;
    for directive in value.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-cache" || lower == "no-store" {
            return MIN_MAX_AGE;
        }
        if let Some(secs) = lower.strip_prefix("max-age=") {
            age = secs
                .trim_matches('"')
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs);
        }
    }
    age.map_or(DEFAULT_MAX_AGE, |a| a.clamp(MIN_MAX_AGE, MAX_MAX_AGE))
}

/// A TLS connector trusting the system's root certificates (ring, like `src/pgtls/`).
fn connector(shown: &str) -> Result<tokio_rustls::TlsConnector, String> {
    let found = rustls_native_certs::load_native_certs();
    for err in &found.errors {
        tracing::debug!(cause = %err, "skipping a system root certificate");
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(format!(
            "{shown}: no system root certificates to verify the server with"
        ));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
