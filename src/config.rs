//! Settings: a TOML file, then the environment, then command-line flags, each layer
//! overriding the one before; then validation into typed values.
//!
//! Every failure names the key (and where it came from) so that an operator can fix it
//! without reading code. The config types do not implement `Serialize`, and secrets live
//! in [`Secret`], whose `Debug` prints `***`: nothing here can leak a secret into a log.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Every key the configuration knows, with the kind of value it takes. Environment
/// variables are derived from it: `server.listen` is `PGFEED_SERVER_LISTEN`.
pub const KEYS: &[(&str, Kind)] = &[
    ("database.url", Kind::Str),
    ("database.pool_size", Kind::Int),
    ("database.query_timeout", Kind::Str),
    ("database.health_interval", Kind::Str),
    ("server.listen", Kind::Str),
    ("server.heartbeat", Kind::Str),
    ("server.shutdown_grace", Kind::Str),
    ("server.retry", Kind::Str),
    ("server.live_buffer", Kind::Int),
    ("server.replay_memory", Kind::Int),
    ("server.max_subscribers", Kind::Int),
    ("server.max_subscribers_per_tenant", Kind::Int),
    ("server.max_stream_rate", Kind::Int),
    ("server.threads", Kind::Int),
    ("server.max_connections", Kind::Int),
    ("server.header_timeout", Kind::Str),
    ("server.write_timeout", Kind::Str),
    ("server.tls_cert_file", Kind::Str),
    ("server.tls_key_file", Kind::Str),
    ("server.h2c", Kind::Bool),
    ("auth.mode", Kind::Str),
    ("auth.secret", Kind::Str),
    ("auth.public_key_file", Kind::Str),
    ("auth.jwks_file", Kind::Str),
    ("auth.issuer", Kind::Str),
    ("auth.audience", Kind::Str),
    ("auth.tenant_claim", Kind::Str),
    ("auth.tables_claim", Kind::Str),
    ("auth.tables_claim_optional", Kind::Bool),
    ("auth.leeway", Kind::Str),
    ("auth.cookie", Kind::Str),
    ("auth.tenant_header", Kind::Str),
    ("auth.allow_remote", Kind::Bool),
    ("cors.allowed_origins", Kind::List),
    ("log.format", Kind::Str),
    ("journal.retention", Kind::Str),
    ("journal.batch_size", Kind::Int),
    ("journal.batch_bytes", Kind::Int),
    ("journal.replay_concurrency", Kind::Int),
    ("journal.prune_interval", Kind::Str),
];

/// The kind of value a key takes, for converting environment strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A string (durations and addresses are strings too).
    Str,
    /// An integer.
    Int,
    /// `true` or `false`.
    Bool,
    /// A list of strings (comma-separated in the environment).
    List,
}

/// A setting that must never be printed.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file named by `--config`.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has an unknown key or a value of the wrong type.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file named by `--config`.
        path: PathBuf,
        /// The TOML parser's description, which names the key and line.
        message: String,
    },
    /// An environment variable or flag has a value of the wrong type, or a
    /// `PGFEED_` variable names no key.
    #[error("{origin}: {message}")]
    Source {
        /// Where the value came from, e.g. `environment variable PGFEED_SERVER_LISTEN`.
        origin: String,
        /// What is wrong with it.
        message: String,
    },
    /// A value that parsed but breaks a rule.
    #[error("invalid setting `{key}`: {message}")]
    Invalid {
        /// The dotted key, e.g. `server.heartbeat`.
        key: &'static str,
        /// The rule it breaks.
        message: String,
    },
    /// Several of the above, all reported at once.
    #[error("{} configuration errors:{}", .0.len(), list(.0))]
    Many(Vec<ConfigError>),
}

fn list(errors: &[ConfigError]) -> String {
    errors.iter().map(|e| format!("\n  - {e}")).collect()
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// The file's shape. Every field is optional: defaults are applied in [`Config::validate`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    database: DatabaseSection,
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    auth: AuthSection,
    #[serde(default)]
    journal: JournalSection,
    #[serde(default)]
    cors: CorsSection,
    #[serde(default)]
    log: LogSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogSection {
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CorsSection {
    allowed_origins: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatabaseSection {
    url: Option<Secret>,
    pool_size: Option<i64>,
    query_timeout: Option<String>,
    health_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    listen: Option<String>,
    heartbeat: Option<String>,
    shutdown_grace: Option<String>,
    retry: Option<String>,
    live_buffer: Option<i64>,
    replay_memory: Option<i64>,
    max_subscribers: Option<i64>,
    max_subscribers_per_tenant: Option<i64>,
    max_stream_rate: Option<i64>,
    threads: Option<i64>,
    max_connections: Option<i64>,
    header_timeout: Option<String>,
    write_timeout: Option<String>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    h2c: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthSection {
    mode: Option<String>,
    secret: Option<Secret>,
    public_key_file: Option<PathBuf>,
    jwks_file: Option<PathBuf>,
    issuer: Option<String>,
    audience: Option<String>,
    tenant_claim: Option<String>,
    tables_claim: Option<String>,
    tables_claim_optional: Option<bool>,
    leeway: Option<String>,
    cookie: Option<String>,
    tenant_header: Option<String>,
    allow_remote: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JournalSection {
    retention: Option<String>,
    batch_size: Option<i64>,
    batch_bytes: Option<i64>,
    replay_concurrency: Option<i64>,
    prune_interval: Option<String>,
}

/// The validated settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// `database.url`: where the application's database is (a `postgres://` URL or a
    /// libpq key=value string). Required by every command but `token`: see
    /// [`Config::database_url`].
    pub database_url: Option<Secret>,
    /// `database.pool_size` (default 8): connections for journal reads, besides the one
    /// LISTEN connection.
    pub pool_size: usize,
    /// `database.query_timeout` (default 30s): longest a journal query may take before its
    /// connection is discarded, so that a silently dead connection cannot hang a reader.
    pub query_timeout: Duration,
    /// `database.health_interval` (default 5s): how often the listener checks its
    /// connection with a NOTIFY to itself; one that does not come back within another
    /// interval marks the connection dead.
    pub health_interval: Duration,
    /// `server.listen` (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// `server.heartbeat` (default 15s): comment line sent on idle streams so that proxies
    /// keep them open and clients notice a dead connection.
    pub heartbeat: Duration,
    /// `server.shutdown_grace` (default 10s): how long shutdown waits for streams to end.
    pub shutdown_grace: Duration,
    /// `server.retry` (default 2s): the reconnect delay sent to EventSource clients.
    pub retry: Duration,
    /// `server.live_buffer` (default 256): events buffered per tenant for live delivery;
    /// a subscriber further behind is caught up from the journal. Each tenant with
    /// streams preallocates this many slots (about 32 bytes each).
    pub live_buffer: usize,
    /// `server.replay_memory` (default 16777216): about how many bytes of the most recent
    /// changes are kept in memory, so that a stream that fell behind its live buffer is
    /// caught up without a journal query; 0 turns it off. Client resumes read the journal.
    pub replay_memory: usize,
    /// `server.max_subscribers` (default 10000): open streams at most; more get 503.
    pub max_subscribers: usize,
    /// `server.max_subscribers_per_tenant` (default 1000): open streams per tenant at
    /// most; more get 429.
    pub max_subscribers_per_tenant: usize,
    /// `server.max_stream_rate` (default 50): new streams per tenant per second (bursts of
    /// twice that); more get 429.
    pub max_stream_rate: u32,
    /// `server.threads` (default: half the CPUs, at least 1): the runtime's worker
    /// threads. pgfeed usually shares its machine with PostgreSQL or the application,
    /// and a commit holds PostgreSQL's serialized NOTIFY section while it waits for a
    /// CPU: on 2 cores, one thread delivered about a quarter more than two
    /// (BENCHMARKS.md). On a machine of its own, set it to the number of CPUs.
    pub threads: usize,
    /// `server.max_connections` (default 11000): open connections at most (streams and
    /// everything else). Beyond it a request gets a JSON 503 `too_many_connections`, while
    /// `/healthz` and `/readyz` are still answered. Lowered at start-up if the open-file
    /// limit cannot hold it.
    pub max_connections: usize,
    /// `server.header_timeout` (default 30s): how long a client may take to send its whole
    /// request head, however slowly it trickles; then it gets 408 and is closed.
    pub header_timeout: Duration,
    /// `server.write_timeout` (default 30s): a stream whose client accepts no bytes for
    /// this long is closed (`pgfeed_write_timeouts_total`).
    pub write_timeout: Duration,
    /// `server.tls_cert_file` and `server.tls_key_file` (default none; both or neither):
    /// the PEM certificate chain and private key the listener serves TLS with (HTTP/2 and
    /// HTTP/1.1 by ALPN), reloaded when either file changes.
    pub tls: Option<TlsFiles>,
    /// `server.h2c` (default false): cleartext connections may also speak HTTP/2 with
    /// prior knowledge (h2c), besides HTTP/1.1.
    pub h2c: bool,
    /// The `auth` section.
    pub auth: AuthConfig,
    /// `cors.allowed_origins` (default `[]`): origins allowed to read responses from a
    /// browser; `"*"` allows any.
    pub cors_origins: Vec<String>,
    /// `log.format` (default `text`): `text` for people, `json` for log pipelines.
    pub log_json: bool,
    /// `journal.retention` (default 24h): how long changes can be replayed.
    pub retention: Duration,
    /// `journal.batch_size` (default 5000): changes per journal read (memory is bounded by
    /// `journal.batch_bytes` too).
    pub batch_size: usize,
    /// `journal.batch_bytes` (default 8388608): row-image bytes after which a journal read
    /// stops early, so huge rows are read a few at a time: as stored (compressed) in the
    /// query, and as text as the rows arrive. Subscribers' reads stop at
    /// [`crate::journal::STREAM_READ_BYTES`] at most.
    pub batch_bytes: usize,
    /// `journal.prune_interval` (default 1m): how often a replica tries to prune changes
    /// older than `journal.retention`.
    pub prune_interval: Duration,
    /// Problems that did not stop loading (unknown `PGFEED_` variables), for the caller to
    /// log once logging is set up.
    pub warnings: Vec<String>,
    /// `journal.replay_concurrency` (default half of `database.pool_size`, at least 1, at
    /// most `database.pool_size`): subscribers' journal reads (resumes, catch-ups) running
    /// at once; more wait their turn, so that a storm of resumes leaves pooled connections
    /// to everything else. The listener reads on a connection of its own.
    pub replay_concurrency: usize,
}

/// The listener's certificate and key files (`server.tls_cert_file`,
/// `server.tls_key_file`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The PEM certificate chain, the server's certificate first.
    pub cert_file: PathBuf,
    /// The PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// How subscribers are authenticated.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// `auth.mode` (default `jwt`).
    pub mode: AuthMode,
    /// `auth.secret`: the HS256 key; see [`AuthConfig::secret`].
    pub secret: Option<Secret>,
    /// `auth.public_key_file`: a PEM public key (RSA for RS256, P-256 for ES256, Ed25519
    /// for EdDSA).
    pub public_key_file: Option<PathBuf>,
    /// `auth.jwks_file`: a JWKS file of public keys, chosen by `kid`, reloaded when the
    /// file changes.
    pub jwks_file: Option<PathBuf>,
    /// `auth.issuer` (default none): the required `iss`.
    pub issuer: Option<String>,
    /// `auth.audience` (default none): the required `aud`.
    pub audience: Option<String>,
    /// `auth.tenant_claim` (default `tenant_id`): the claim naming the tenant.
    pub tenant_claim: String,
    /// `auth.tables_claim` (default none): a claim listing the tables a token may see.
    /// When set, a token without it is refused unless `tables_claim_optional`.
    pub tables_claim: Option<String>,
    /// `auth.tables_claim_optional` (default false): a token without the tables claim sees
    /// every table instead of being refused.
    pub tables_claim_optional: bool,
    /// `auth.leeway` (default 5s): clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    /// `auth.cookie` (default none): a cookie that may carry the token.
    pub cookie: Option<String>,
    /// `auth.tenant_header` (default `X-Tenant-Id`): the header naming the tenant in
    /// `trusted_header` (and `none`) mode.
    pub tenant_header: String,
}

/// `auth.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// Verified JWTs.
    Jwt,
    /// The tenant from a header set by the application's own proxy.
    TrustedHeader,
    /// No authentication (development only): the tenant from the `tenant` query
    /// parameter or the tenant header.
    None,
}

impl AuthMode {
    /// The mode as `auth.mode` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Jwt => "jwt",
            AuthMode::TrustedHeader => "trusted_header",
            AuthMode::None => "none",
        }
    }
}

impl AuthConfig {
    /// HS256 settings with `secret` and every other setting at its default.
    pub fn hs256(secret: &str) -> AuthConfig {
        AuthConfig {
            mode: AuthMode::Jwt,
            secret: Some(Secret::new(secret)),
            public_key_file: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            tenant_claim: "tenant_id".into(),
            tables_claim: None,
            tables_claim_optional: false,
            leeway: Duration::from_secs(5),
            cookie: None,
            tenant_header: "X-Tenant-Id".into(),
        }
    }

    /// The HS256 secret, or the error that says how to set it.
    pub fn secret(&self) -> Result<&Secret, ConfigError> {
        self.secret.as_ref().ok_or_else(|| {
            invalid(
                "auth.secret",
                "is required to sign tokens (the HS256 secret): set it in the config file or PGFEED_AUTH_SECRET",
            )
        })
    }
}

/// Where settings come from, besides the file.
#[derive(Debug, Default)]
pub struct Sources {
    /// The `--config` file, if any.
    pub file: Option<PathBuf>,
    /// Environment variables (the process environment in `main`, a map in tests).
    pub env: Vec<(String, String)>,
    /// Flag overrides as (key, value), highest precedence.
    pub flags: Vec<(&'static str, String)>,
}

impl Sources {
    /// Sources with the process environment.
    pub fn from_process(file: Option<PathBuf>) -> Sources {
        Sources {
            file,
            env: std::env::vars().collect(),
            flags: Vec::new(),
        }
    }
}

impl Config {
    /// The database URL, or the error that says how to set it.
    pub fn database_url(&self) -> Result<&Secret, ConfigError> {
        self.database_url.as_ref().ok_or_else(|| {
            invalid(
                "database.url",
                "is required: set it in the config file, or DATABASE_URL / PGFEED_DATABASE_URL",
            )
        })
    }

    /// Loads and validates: file, then environment, then flags. Every problem is
    /// reported at once, each naming its `section.key` and where the value came from (the
    /// file and line, the environment variable or the flag).
    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        let mut errs = Vec::new();
        let mut origins: BTreeMap<&'static str, String> = BTreeMap::new();
        let mut table = match &sources.file {
            Some(path) => {
                let (table, text) = read_file(path)?;
                check_file(&table, path, &text, &mut errs, &mut origins);
                table
            }
            None => toml::Table::new(),
        };
        let (overrides, warnings) = env_overrides(&sources.env);
        for (origin, key, value) in overrides {
            match set_key(&mut table, key, value, &origin) {
                Ok(()) => {
                    origins.insert(key, origin);
                }
                Err(err) => errs.push(err),
            }
        }
        for (key, value) in &sources.flags {
            let origin = format!("flag for `{key}`");
            match set_key(&mut table, key, value.clone(), &origin) {
                Ok(()) => {
                    origins.insert(key, origin);
                }
                Err(err) => errs.push(err),
            }
        }
        if !errs.is_empty() {
            return Err(many(errs));
        }
        let file: FileConfig =
            table
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Source {
                    origin: sources.file.as_ref().map_or("settings".to_string(), |p| {
                        format!("settings from {}", p.display())
                    }),
                    message: e.message().to_string(),
                })?;
        let mut config = Config::validate(file).map_err(|err| locate(err, &origins))?;
        config.warnings = warnings;
        Ok(config)
    }

    fn validate(file: FileConfig) -> Result<Config, ConfigError> {
        // Every problem is collected, so that an operator fixes them all in one go.
        let mut errs = Vec::new();
        let database_url = file.database.url;
        if database_url
            .as_ref()
            .is_some_and(|u| u.expose().trim().is_empty())
        {
            errs.push(invalid("database.url", "must not be empty"));
        }
        let listen = file.server.listen.as_deref().unwrap_or("127.0.0.1:8080");
        let listen: SocketAddr = listen
            .parse()
            .map_err(|_| {
                invalid(
                    "server.listen",
                    format!("{listen:?} is not an address of the form 127.0.0.1:8080"),
                )
            })
            .unwrap_or_else(|e| {
                errs.push(e);
                SocketAddr::from(([127, 0, 0, 1], 8080))
            });
        let auth = &file.auth;
        let mode = match auth.mode.as_deref().unwrap_or("jwt") {
            "jwt" => AuthMode::Jwt,
            "trusted_header" => AuthMode::TrustedHeader,
            "none" => AuthMode::None,
            other => {
                errs.push(invalid(
                    "auth.mode",
                    format!("{other:?} is not one of \"jwt\", \"trusted_header\", \"none\""),
                ));
                AuthMode::Jwt
            }
        };
        if mode != AuthMode::Jwt
            && !listen.ip().is_loopback()
            && !auth.allow_remote.unwrap_or(false)
        {
            errs.push(invalid(
                "auth.mode",
                format!(
                    "{:?} trusts whoever can reach the port, so it is refused on the non-loopback \
                     address {listen}; listen on 127.0.0.1 behind your proxy, or set \
                     auth.allow_remote = true if only that proxy can reach this address",
                    auth.mode.as_deref().unwrap_or_default()
                ),
            ));
        }
        let secret = auth.secret.clone();
        if secret.as_ref().is_some_and(|s| s.expose().len() < 16) {
            errs.push(invalid("auth.secret", "must be at least 16 bytes long"));
        }
        let sources = [
            secret.is_some(),
            auth.public_key_file.is_some(),
            auth.jwks_file.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            errs.push(invalid(
                "auth.secret",
                "only one of auth.secret, auth.public_key_file and auth.jwks_file may be set",
            ));
        }
        let tenant_claim = auth
            .tenant_claim
            .clone()
            .unwrap_or_else(|| "tenant_id".into());
        if tenant_claim.is_empty() {
            errs.push(invalid("auth.tenant_claim", "must not be empty"));
        }
        if auth.tables_claim.as_deref() == Some("") {
            errs.push(invalid("auth.tables_claim", "must not be empty when set"));
        }
        let tables_claim_optional = auth.tables_claim_optional.unwrap_or(false);
        if tables_claim_optional && auth.tables_claim.is_none() {
            return Err(invalid(
                "auth.tables_claim_optional",
                "only means something with auth.tables_claim set",
            ));
        }
        let tenant_header = auth
            .tenant_header
            .clone()
            .unwrap_or_else(|| "X-Tenant-Id".into());
        if hyper::header::HeaderName::from_bytes(tenant_header.as_bytes()).is_err() {
            errs.push(invalid(
                "auth.tenant_header",
                format!("{tenant_header:?} is not a header name"),
            ));
        }
        if let Some(cookie) = &auth.cookie
            && (cookie.is_empty() || cookie.contains([';', '=', ' ', ',']))
        {
            errs.push(invalid(
                "auth.cookie",
                format!("{cookie:?} is not a cookie name"),
            ));
        }
        let tls = tls_files(&file.server, &mut errs);
        let cors_origins = file.cors.allowed_origins.clone().unwrap_or_default();
        for origin in &cors_origins {
            let ok = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/')
                    && hyper::header::HeaderValue::from_str(origin).is_ok());
            if !ok {
                errs.push(invalid(
                    "cors.allowed_origins",
                    format!(
                        "{origin:?} is not an origin like \"https://app.example.com\" (no path, no trailing slash) or \"*\""
                    ),
                ));
            }
        }
        let pool_size = take(
            &mut errs,
            positive("database.pool_size", file.database.pool_size, 8, 1000),
        );
        let replay_concurrency = match file.journal.replay_concurrency {
            Some(v) if v > pool_size as i64 => {
                errs.push(invalid(
                    "journal.replay_concurrency",
                    format!(
                        "must be at most database.pool_size ({pool_size}), got {v}: replays beyond it would only wait for connections"
                    ),
                ));
                1
            }
            value => take(
                &mut errs,
                positive(
                    "journal.replay_concurrency",
                    value,
                    (pool_size / 2).max(1),
                    pool_size.max(1),
                ),
            ),
        };
        let config = Config {
            database_url,
            pool_size,
            query_timeout: take(
                &mut errs,
                duration(
                    "database.query_timeout",
                    &file.database.query_timeout,
                    "30s",
                    true,
                ),
            ),
            health_interval: take(
                &mut errs,
                duration(
                    "database.health_interval",
                    &file.database.health_interval,
                    "5s",
                    true,
                ),
            ),
            listen,
            heartbeat: take(
                &mut errs,
                duration("server.heartbeat", &file.server.heartbeat, "15s", true),
            ),
            shutdown_grace: take(
                &mut errs,
                duration(
                    "server.shutdown_grace",
                    &file.server.shutdown_grace,
                    "10s",
                    false,
                ),
            ),
            retry: take(
                &mut errs,
                duration("server.retry", &file.server.retry, "2s", true),
            ),
            live_buffer: take(
                &mut errs,
                positive("server.live_buffer", file.server.live_buffer, 256, 1 << 20),
            ),
            replay_memory: take(
                &mut errs,
                bytes(
                    "server.replay_memory",
                    file.server.replay_memory,
                    crate::fanout::RECENT_BYTES,
                ),
            ),
            max_subscribers: take(
                &mut errs,
                positive(
                    "server.max_subscribers",
                    file.server.max_subscribers,
                    10_000,
                    10_000_000,
                ),
            ),
            max_subscribers_per_tenant: take(
                &mut errs,
                positive(
                    "server.max_subscribers_per_tenant",
                    file.server.max_subscribers_per_tenant,
                    1000,
                    10_000_000,
                ),
            ),
            max_stream_rate: take(
                &mut errs,
                positive(
                    "server.max_stream_rate",
                    file.server.max_stream_rate,
                    50,
                    1_000_000,
                ),
            ) as u32,
            threads: take(
                &mut errs,
                positive(
                    "server.threads",
                    file.server.threads,
                    default_threads(),
                    1024,
                ),
            ),
            max_connections: take(
                &mut errs,
                positive(
                    "server.max_connections",
                    file.server.max_connections,
                    11_000,
                    10_000_000,
                ),
            ),
            header_timeout: take(
                &mut errs,
                duration(
                    "server.header_timeout",
                    &file.server.header_timeout,
                    "30s",
                    true,
                ),
            ),
            write_timeout: take(
                &mut errs,
                duration(
                    "server.write_timeout",
                    &file.server.write_timeout,
                    "30s",
                    true,
                ),
            ),
            tls,
            h2c: file.server.h2c.unwrap_or(false),
            auth: AuthConfig {
                mode,
                secret,
                public_key_file: auth.public_key_file.clone(),
                jwks_file: auth.jwks_file.clone(),
                issuer: auth.issuer.clone(),
                audience: auth.audience.clone(),
                tenant_claim,
                tables_claim: auth.tables_claim.clone(),
                tables_claim_optional,
                leeway: take(
                    &mut errs,
                    duration("auth.leeway", &auth.leeway, "5s", false),
                ),
                cookie: auth.cookie.clone(),
                tenant_header,
            },
            cors_origins,
            log_json: match file.log.format.as_deref().unwrap_or("text") {
                "text" => false,
                "json" => true,
                other => {
                    errs.push(invalid(
                        "log.format",
                        format!("{other:?} is not \"text\" or \"json\""),
                    ));
                    false
                }
            },
            retention: take(
                &mut errs,
                duration("journal.retention", &file.journal.retention, "24h", true),
            ),
            batch_size: take(
                &mut errs,
                positive("journal.batch_size", file.journal.batch_size, 5000, 100_000),
            ),
            batch_bytes: take(
                &mut errs,
                positive(
                    "journal.batch_bytes",
                    file.journal.batch_bytes,
                    8 << 20,
                    1 << 30,
                ),
            ),
            prune_interval: take(
                &mut errs,
                duration(
                    "journal.prune_interval",
                    &file.journal.prune_interval,
                    "1m",
                    true,
                ),
            ),
            warnings: Vec::new(),
            replay_concurrency,
        };
        match errs.len() {
            0 => Ok(config),
            1 => Err(errs.remove(0)),
            _ => Err(ConfigError::Many(errs)),
        }
    }
}

/// `server.tls_cert_file` and `server.tls_key_file`: both or neither, neither empty. The
/// files themselves are read when the gateway starts (`crate::http::tls`).
fn tls_files(server: &ServerSection, errs: &mut Vec<ConfigError>) -> Option<TlsFiles> {
    let empty = |p: &Option<PathBuf>| p.as_ref().is_some_and(|p| p.as_os_str().is_empty());
    let mut ok = true;
    for (key, value) in [
        ("server.tls_cert_file", &server.tls_cert_file),
        ("server.tls_key_file", &server.tls_key_file),
    ] {
        if empty(value) {
            errs.push(invalid(key, "must not be empty when set"));
            ok = false;
        }
    }
    match (&server.tls_cert_file, &server.tls_key_file) {
        (Some(cert_file), Some(key_file)) if ok => Some(TlsFiles {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
        }),
        (Some(_), None) => {
            errs.push(invalid(
                "server.tls_key_file",
                "is required with server.tls_cert_file: TLS needs both the certificate and its private key",
            ));
            None
        }
        (None, Some(_)) => {
            errs.push(invalid(
                "server.tls_cert_file",
                "is required with server.tls_key_file: TLS needs both the certificate and its private key",
            ));
            None
        }
        _ => None,
    }
}

/// A check's value, or its type's default with the error collected in `errs`.
fn take<T: Default>(errs: &mut Vec<ConfigError>, result: Result<T, ConfigError>) -> T {
    result.unwrap_or_else(|err| {
        errs.push(err);
        T::default()
    })
}

fn read_file(path: &Path) -> Result<(toml::Table, String), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let table = text
        .parse::<toml::Table>()
        .map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok((table, text))
}

/// One error, or all of them.
fn many(mut errs: Vec<ConfigError>) -> ConfigError {
    if errs.len() == 1 {
        errs.remove(0)
    } else {
        ConfigError::Many(errs)
    }
}

/// Adds where an invalid value came from to its error.
fn locate(err: ConfigError, origins: &BTreeMap<&'static str, String>) -> ConfigError {
    match err {
        ConfigError::Invalid { key, message } => match origins.get(key) {
            Some(origin) => ConfigError::Invalid {
                key,
                message: format!("{message} (set by {origin})"),
            },
            None => ConfigError::Invalid { key, message },
        },
        ConfigError::Many(errs) => {
            ConfigError::Many(errs.into_iter().map(|e| locate(e, origins)).collect())
        }
        other => other,
    }
}

/// The sections of the config file.
const SECTIONS: &[&str] = &["database", "server", "auth", "journal", "cors", "log"];

/// Checks the file's sections, keys and value types, collecting every problem with its
/// file and line; records where each key was set.
fn check_file(
    table: &toml::Table,
    path: &Path,
    text: &str,
    errs: &mut Vec<ConfigError>,
    origins: &mut BTreeMap<&'static str, String>,
) {
    let place = |section: &str, key: Option<&str>| match find_line(text, section, key) {
        Some(line) => format!("{} line {line}", path.display()),
        None => path.display().to_string(),
    };
    for (section, value) in table {
        if !SECTIONS.contains(&section.as_str()) {
            errs.push(ConfigError::Source {
                origin: place(section, None),
                message: format!(
                    "unknown section `[{section}]` (the sections are {})",
                    SECTIONS.join(", ")
                ),
            });
            continue;
        }
        let Some(keys) = value.as_table() else {
            errs.push(ConfigError::Source {
                origin: place(section, None),
                message: format!("`{section}` must be a section (`[{section}]`)"),
            });
            continue;
        };
        for (name, value) in keys {
            let dotted = format!("{section}.{name}");
            let origin = place(section, Some(name));
            let Some((key, kind)) = KEYS.iter().find(|(k, _)| *k == dotted) else {
                errs.push(ConfigError::Source {
                    origin,
                    message: format!(
                        "unknown key `{dotted}` (see config.example.toml for the keys)"
                    ),
                });
                continue;
            };
            let fits = match kind {
                Kind::Str => value.is_str(),
                Kind::Int => value.is_integer(),
                Kind::Bool => value.is_bool(),
                Kind::List => value
                    .as_array()
                    .is_some_and(|items| items.iter().all(toml::Value::is_str)),
            };
            if !fits {
                let wanted = match kind {
                    Kind::Str if is_duration(key) => "a string such as \"15s\" (a duration)",
                    Kind::Str => "a string",
                    Kind::Int => "an integer (without quotes)",
                    Kind::Bool => "true or false",
                    Kind::List => "a list of strings",
                };
                let shown: String = value.to_string().chars().take(64).collect();
                errs.push(ConfigError::Invalid {
                    key,
                    message: format!(
                        "must be {wanted}, got {} `{shown}` (set by {origin})",
                        value.type_str()
                    ),
                });
            }
            origins.insert(key, origin);
        }
    }
}

/// Whether `key` takes a duration.
fn is_duration(key: &str) -> bool {
    let name = key.rsplit('.').next().unwrap_or(key);
    name.ends_with("timeout")
        || name.ends_with("interval")
        || matches!(
            name,
            "heartbeat" | "shutdown_grace" | "retry" | "leeway" | "retention"
        )
}

/// The 1-based line of `[section]` (no `key`) or of `key = ...` inside it, as most files
/// write them (dotted `section.key = ...` at the top too).
fn find_line(text: &str, section: &str, key: Option<&str>) -> Option<usize> {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            current = name.trim().to_string();
            if key.is_none() && current == section {
                return Some(i + 1);
            }
            continue;
        }
        let Some(key) = key else { continue };
        let Some((left, _)) = line.split_once('=') else {
            continue;
        };
        let left = left.trim().trim_matches('"');
        if (current == section && left == key)
            || (current.is_empty() && left == format!("{section}.{key}"))
        {
            return Some(i + 1);
        }
    }
    None
}

/// Environment variables that set keys, as (origin, key, value), and warnings for the
/// `PGFEED_` variables that name no key. `DATABASE_URL` sets `database.url` unless
/// `PGFEED_DATABASE_URL` does. `PGFEED_TEST_*` belongs to the test suite, `PGFEED_LOG` to
/// logging and `PGFEED_CONFIG` names the config file; any other `PGFEED_` variable that
/// names no key is ignored with a warning (Kubernetes injects `PGFEED_SERVICE_HOST`,
/// `PGFEED_PORT`, ... for a Service named `pgfeed`), while an unknown key in the config
/// file stays an error.
fn env_overrides(env: &[(String, String)]) -> (Vec<(String, &'static str, String)>, Vec<String>) {
    let mut found: BTreeMap<&'static str, (String, String)> = BTreeMap::new();
    let mut warnings = Vec::new();
    for (name, value) in env {
        if name == "DATABASE_URL" {
            found
                .entry("database.url")
                .or_insert_with(|| (format!("environment variable {name}"), value.clone()));
            continue;
        }
        let Some(rest) = name.strip_prefix("PGFEED_") else {
            continue;
        };
        if rest.starts_with("TEST_") || rest == "LOG" || rest == "CONFIG" {
            continue;
        }
        match KEYS
            .iter()
            .map(|(k, _)| *k)
            .find(|k| k.replace('.', "_").eq_ignore_ascii_case(rest))
        {
            Some(key) => {
                found.insert(key, (format!("environment variable {name}"), value.clone()));
            }
            None => warnings.push(format!(
                "ignoring environment variable {name}: it names no setting (see config.example.toml for the keys)"
            )),
        }
    }
    (
        found.into_iter().map(|(k, (o, v))| (o, k, v)).collect(),
        warnings,
    )
}

/// Sets `section.key` in the table from a string, converting it to the key's kind.
fn set_key(
    table: &mut toml::Table,
    key: &'static str,
    value: String,
    origin: &str,
) -> Result<(), ConfigError> {
    let kind = KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, kind)| *kind)
        .expect("flags and env only set known keys");
    let value = match kind {
        Kind::Str => toml::Value::String(value),
        Kind::Bool => match value.trim() {
            "true" | "1" | "yes" => toml::Value::Boolean(true),
            "false" | "0" | "no" => toml::Value::Boolean(false),
            _ => {
                return Err(ConfigError::Source {
                    origin: origin.to_string(),
                    message: format!("`{key}` must be true or false, got {value:?}"),
                });
            }
        },
        Kind::List => toml::Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(|v| toml::Value::String(v.to_string()))
                .collect(),
        ),
        Kind::Int => {
            toml::Value::Integer(value.trim().parse().map_err(|_| ConfigError::Source {
                origin: origin.to_string(),
                message: format!("`{key}` must be an integer, got {value:?}"),
            })?)
        }
    };
    let (section, name) = key.split_once('.').expect("keys are section.name");
    let entry = table
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match entry {
        toml::Value::Table(t) => {
            t.insert(name.to_string(), value);
            Ok(())
        }
        _ => Err(ConfigError::Source {
            origin: origin.to_string(),
            message: format!("`{section}` must be a table"),
        }),
    }
}

fn duration(
    key: &'static str,
    value: &Option<String>,
    default: &str,
    nonzero: bool,
) -> Result<Duration, ConfigError> {
    let text = value.as_deref().unwrap_or(default);
    let d = humantime::parse_duration(text).map_err(|e| {
        invalid(
            key,
            format!("{text:?} is not a duration like \"15s\" or \"24h\" ({e})"),
        )
    })?;
    if nonzero && d.is_zero() {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(d)
}

fn positive(
    key: &'static str,
    value: Option<i64>,
    default: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) if v >= 1 && (v as u64) <= max as u64 => Ok(v as usize),
        Some(v) => Err(invalid(
            key,
            format!("must be between 1 and {max}, got {v}"),
        )),
    }
}

/// Half the CPUs this process may use, at least 1: the default of `server.threads`.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// A byte count: 0 or more, at most 1 TiB.
fn bytes(key: &'static str, value: Option<i64>, default: usize) -> Result<usize, ConfigError> {
    const MAX: i64 = 1 << 40;
    match value {
        None => Ok(default),
        Some(v) if (0..=MAX).contains(&v) => Ok(v as usize),
        Some(v) => Err(invalid(
            key,
            format!("must be between 0 and {MAX} bytes, got {v}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn base() -> Vec<(String, String)> {
        env(&[
            ("DATABASE_URL", "postgres://x/y"),
            ("PGFEED_AUTH_SECRET", "0123456789abcdef"),
        ])
    }

    #[test]
    fn defaults_apply() {
        let c = Config::load(&Sources {
            env: base(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.heartbeat, Duration::from_secs(15));
        assert_eq!(c.shutdown_grace, Duration::from_secs(10));
        assert_eq!(c.retention, Duration::from_secs(24 * 3600));
        assert_eq!(c.auth.tenant_claim, "tenant_id");
        assert!(c.auth.tables_claim.is_none());
    }

    #[test]
    fn threads_default_to_half_the_cpus_and_are_checked() {
        let load = |threads: Option<&str>| {
            let mut e = base();
            if let Some(t) = threads {
                e.push(("PGFEED_SERVER_THREADS".into(), t.into()));
            }
            Config::load(&Sources {
                env: e,
                ..Default::default()
            })
        };
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(load(None).unwrap().threads, (cpus / 2).max(1));
        assert_eq!(load(Some("3")).unwrap().threads, 3);
        for bad in ["0", "-1", "100000", "many"] {
            let err = load(Some(bad)).unwrap_err().to_string();
            assert!(err.contains("server.threads"), "{bad}: {err}");
        }
    }

    #[test]
    fn replay_concurrency_defaults_to_half_the_pool_and_is_checked() {
        let load = |pool: &str, replays: Option<&str>| {
            let mut e = base();
            e.push(("PGFEED_DATABASE_POOL_SIZE".into(), pool.into()));
            if let Some(r) = replays {
                e.push(("PGFEED_JOURNAL_REPLAY_CONCURRENCY".into(), r.into()));
            }
            Config::load(&Sources {
                env: e,
                ..Default::default()
            })
        };
        assert_eq!(load("8", None).unwrap().replay_concurrency, 4);
        assert_eq!(load("1", None).unwrap().replay_concurrency, 1);
        assert_eq!(load("8", Some("8")).unwrap().replay_concurrency, 8);
        for bad in ["0", "-2", "9", "all"] {
            let err = load("8", Some(bad)).unwrap_err().to_string();
            assert!(err.contains("journal.replay_concurrency"), "{bad}: {err}");
        }
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = std::env::temp_dir().join(format!("pgfeed-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.toml");
        std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:1\"\nheartbeat = \"3s\"\n[database]\nurl = \"postgres://file/db\"\n").unwrap();
        let mut e = base();
        e.push(("PGFEED_SERVER_LISTEN".into(), "127.0.0.1:2".into()));
        let c = Config::load(&Sources {
            file: Some(path.clone()),
            env: e.clone(),
            flags: vec![],
        })
        .unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.heartbeat, Duration::from_secs(3));
        // DATABASE_URL from the environment overrides the file.
        assert_eq!(c.database_url().unwrap().expose(), "postgres://x/y");
        let c = Config::load(&Sources {
            file: Some(path),
            env: e,
            flags: vec![("server.listen", "127.0.0.1:3".into())],
        })
        .unwrap();
        assert_eq!(c.listen.port(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn errors_name_the_key() {
        let mut e = base();
        e.push(("PGFEED_SERVER_HEARTBEAT".into(), "soon".into()));
        let err = Config::load(&Sources {
            env: e,
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("server.heartbeat"), "{err}");

        let c = Config::load(&Sources {
            env: env(&[("PGFEED_AUTH_SECRET", "0123456789abcdef")]),
            ..Default::default()
        })
        .unwrap();
        let err = c.database_url().unwrap_err().to_string();
        assert!(err.contains("database.url"), "{err}");

        // A misspelt variable is not fatal (Kubernetes injects PGFEED_* variables of its
        // own), but it is named in a warning.
        let mut e = base();
        e.push(("PGFEED_SERVER_LISTN".into(), "x".into()));
        let c = Config::load(&Sources {
            env: e,
            ..Default::default()
        })
        .unwrap();
        assert!(
            c.warnings.iter().any(|w| w.contains("PGFEED_SERVER_LISTN")),
            "{:?}",
            c.warnings
        );

        let mut e = base();
        e.push(("PGFEED_DATABASE_POOL_SIZE".into(), "many".into()));
        let err = Config::load(&Sources {
            env: e,
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("database.pool_size"), "{err}");
    }

    #[test]
    fn unknown_file_key_is_named() {
        let dir = std::env::temp_dir().join(format!("pgfeed-config-u-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.toml");
        std::fs::write(&path, "[server]\nlisten_addr = \"x\"\n").unwrap();
        let err = Config::load(&Sources {
            file: Some(path),
            env: base(),
            flags: vec![],
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("listen_addr"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn secret_debug_is_redacted() {
        let c = Config::load(&Sources {
            env: base(),
            ..Default::default()
        })
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("0123456789abcdef") && !shown.contains("postgres://x/y"),
            "{shown}"
        );
    }

    #[test]
    fn example_file_documents_every_key_with_its_default() {
        let text = include_str!("../config.example.toml");
        let mut section = "";
        let mut documented = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name;
            } else if let Some((key, _)) = line.trim_start_matches("# ").split_once(" = ")
                && key
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                documented.push(format!("{section}.{key}"));
            }
        }
        for (key, _) in KEYS {
            assert!(
                documented.iter().any(|d| d == key),
                "config.example.toml does not document `{key}`"
            );
        }
        for key in &documented {
            assert!(
                KEYS.iter().any(|(k, _)| k == key),
                "config.example.toml documents unknown key `{key}`"
            );
        }
        // The values it sets are the defaults.
        let dir = std::env::temp_dir().join(format!("pgfeed-config-ex-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("example.toml");
        std::fs::write(&path, text).unwrap();
        let from_file = Config::load(&Sources {
            file: Some(path),
            env: base(),
            flags: vec![],
        })
        .unwrap();
        let defaults = Config::load(&Sources {
            env: base(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(format!("{from_file:?}"), format!("{defaults:?}"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
