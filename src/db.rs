//! Connections to the application's database: parsing the URL, the settings of every
//! connection (keepalives, application names, the pinned `search_path`, the pooled
//! connections' `statement_timeout`), the pool and the handle for queries on it ([`Db`],
//! bounded by `database.query_timeout`), the listener's two connections, and single
//! connections for the CLI.
//!
//! Everything that opens a connection goes through here so that these settings and TLS
//! ([`crate::pgtls`]) are set in one place. This module runs no pgfeed queries itself.

use std::io::Write as _;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use crate::config::Secret;
use crate::pgtls::{MakeRustlsConnect, SslMode, TlsError};

mod handle;

pub use handle::{Db, DecodeError, QueryError, decode, schema_missing};

/// A parsed `database.url`: the driver's settings and how connections are secured.
#[derive(Clone)]
pub struct DbConfig {
    /// Host, credentials, options; its `ssl_mode` is set from [`DbConfig::sslmode`].
    pub pg: tokio_postgres::Config,
    /// The TLS connector for `sslmode` and `sslrootcert` (unused under `disable`).
    pub tls: MakeRustlsConnect,
    /// libpq's `sslmode` in force (`prefer` when the URL names none).
    pub sslmode: SslMode,
    /// `sslrootcert` (a path, or `system`), to say which CAs were tried when one fails.
    pub sslrootcert: Option<String>,
}

impl DbConfig {
    /// Parses a connection string (URL or key/value) as libpq would for `sslmode` and
    /// `sslrootcert`, without pgfeed's settings ([`parse_url`] adds them).
    pub fn parse(url: &str) -> Result<DbConfig, DbError> {
        let split = crate::pgtls::split(url).map_err(DbError::Tls)?;
        let mut pg: tokio_postgres::Config = split.rest.parse().map_err(DbError::Url)?;
        let (sslmode, tls) =
            crate::pgtls::connector(split.sslmode.as_deref(), split.sslrootcert.as_deref())
                .map_err(DbError::Tls)?;
        crate::pgtls::apply(sslmode, &mut pg);
        Ok(DbConfig {
            pg,
            tls,
            sslmode,
            sslrootcert: split.sslrootcert,
        })
    }

    /// Opens one connection; the caller drives the returned connection.
    pub async fn connect(
        &self,
    ) -> Result<(tokio_postgres::Client, Connection), tokio_postgres::Error> {
        self.pg.connect(self.tls.clone()).await
    }
}

/// The half of a connection that talks to the server, encrypted or not.
pub type Connection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

/// A connection problem.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// `database.url` could not be parsed.
    #[error("invalid setting `database.url`: {0}")]
    Url(#[source] tokio_postgres::Error),
    /// A TLS parameter of `database.url` (`sslmode`, `sslrootcert`) cannot be used.
    #[error("invalid setting `database.url`: {0}")]
    Tls(#[source] TlsError),
    /// Connecting failed.
    #[error(
        "cannot connect to PostgreSQL at {endpoint}{}",
        .hint.as_ref().map_or(String::new(), |hint| format!(": {hint}"))
    )]
    Connect {
        /// `host:port/dbname` ([`endpoint`]), never the credentials.
        endpoint: String,
        /// What the cause means for the settings, when the driver's words do not say
        /// (a certificate from a CA not trusted: which CAs were).
        hint: Option<String>,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The pool could not be built.
    #[error("cannot create the connection pool")]
    Pool(#[source] deadpool_postgres::BuildError),
}

/// The `search_path` of every connection pgfeed opens, as a startup option.
/// Also pins the isolation level: pgfeed's statements (sealing above all) are written for
/// READ COMMITTED, whatever default a role or database sets.
pub const PINNED_SEARCH_PATH: &str =
    "-c search_path=pg_catalog,pg_temp -c default_transaction_isolation=read\\ committed";

/// Appends [`PINNED_SEARCH_PATH`] to `config`'s options. Last, so that it wins over the
/// URL's own options and, being a client setting, over any `ALTER DATABASE/ROLE ... SET
/// search_path`: no schema an application role can create objects in is ever searched, so
/// an operator or function it defines (an exact-match `=` in `public`, say) is never picked
/// by pgfeed's SQL, which runs with the gateway's or the installer's privileges. pg_temp
/// is named last so that it is not searched first for tables.
pub fn pin_search_path(config: &mut tokio_postgres::Config) {
    let options = match config.get_options() {
        Some(theirs) => format!("{theirs} {PINNED_SEARCH_PATH}"),
        None => PINNED_SEARCH_PATH.to_string(),
    };
    config.options(&options);
}

/// Parses `database.url` and applies pgfeed's connection settings.
pub fn parse_url(url: &Secret) -> Result<DbConfig, DbError> {
    let mut db = DbConfig::parse(url.expose())?;
    let config = &mut db.pg;
    if config.get_application_name().is_none() {
        config.application_name("pgfeed");
    }
    // Keepalives let a dead peer be noticed instead of waited on for hours.
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(10));
    config.keepalives_interval(Duration::from_secs(5));
    config.keepalives_retries(3);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    // The journal read is one small keyset query run thousands of times: JIT compilation
    // (triggered by inflated estimates once the journal is large) cost ~17 ms per read,
    // and custom re-planning cost more than executing it (measured by pgfeed-bench, see
    // BENCHMARKS.md). Settings the operator put in the URL's options come after ours.
    let mut options = String::from("-c jit=off -c plan_cache_mode=force_generic_plan");
    if let Some(theirs) = config.get_options() {
        options.push(' ');
        options.push_str(theirs);
    }
    config.options(&options);
    pin_search_path(config);
    Ok(db)
}

impl DbError {
    /// A failure to connect with `config`.
    pub fn connect(config: &DbConfig, source: tokio_postgres::Error) -> DbError {
        DbError::Connect {
            endpoint: endpoint(config),
            hint: crate::pgtls::explain(&source, config.sslrootcert.as_deref()),
            source,
        }
    }
}

/// Where `config` connects, as `host:port/dbname` (never the user's password), for logs.
pub fn endpoint(config: &DbConfig) -> String {
    use tokio_postgres::config::Host;
    let config = &config.pg;
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]:{port}"),
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(dir) => format!("{}:{port}", dir.display()),
            }
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "localhost:5432".to_string()
    } else {
        hosts.join(",")
    };
    format!("{hosts}/{}", config.get_dbname().unwrap_or("-"))
}

/// `config` for the gateway's pooled connections: each session cancels, on the server,
/// any statement that runs longer than `timeout` (`database.query_timeout`), set as a
/// startup option like the pinned `search_path`. A read the gateway gave up on (it drops
/// the connection) would otherwise keep running, or keep waiting for a lock, on the
/// server. First among the options, so that a `statement_timeout` the operator put in the
/// URL's options wins. Not for the CLI, whose install may run longer.
pub fn with_statement_timeout(config: &DbConfig, timeout: Duration) -> DbConfig {
    let mut config = config.clone();
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128);
    let options = match config.pg.get_options() {
        Some(rest) => format!("-c statement_timeout={ms} {rest}"),
        None => format!("-c statement_timeout={ms}"),
    };
    config.pg.options(&options);
    config
}

/// `application_name` of the LISTEN connection, so operators (and `pgfeed status`) can
/// tell it from pooled connections in `pg_stat_activity`.
pub const LISTENER_APPLICATION_NAME: &str = "pgfeed-listener";

/// `application_name` of the connection the listener reads the journal on (its own, not
/// one of the pool's, so that subscribers' reads never hold up the listener's).
pub const READER_APPLICATION_NAME: &str = "pgfeed-reader";

/// The pool's settings (`pool_config`) named `name`, unless the operator chose a name.
fn named(pool_config: &DbConfig, name: &str) -> DbConfig {
    let mut config = pool_config.clone();
    if config.pg.get_application_name() == Some("pgfeed") {
        config.pg.application_name(name);
    }
    config
}

/// The LISTEN connection's settings: the pool's, named [`LISTENER_APPLICATION_NAME`]
/// unless the operator chose a name.
pub fn listener_config(pool_config: &DbConfig) -> DbConfig {
    named(pool_config, LISTENER_APPLICATION_NAME)
}

/// The settings of the listener's reading connection: the pool's (`pool_config`), named
/// [`READER_APPLICATION_NAME`] unless the operator chose a name.
pub fn reader_config(pool_config: &DbConfig) -> DbConfig {
    named(pool_config, READER_APPLICATION_NAME)
}

/// The pool for journal reads and other short queries.
pub fn pool(config: &DbConfig, size: usize) -> Result<Pool, DbError> {
    let manager = Manager::from_config(
        config.pg.clone(),
        config.tls.clone(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .create_timeout(Some(Duration::from_secs(10)))
        .wait_timeout(Some(Duration::from_secs(10)))
        .build()
        .map_err(DbError::Pool)
}

/// One connection, driven by a background task that ends when the client is dropped.
pub async fn connect(config: &DbConfig) -> Result<tokio_postgres::Client, DbError> {
    let (client, connection) = config
        .connect()
        .await
        .map_err(|source| DbError::connect(config, source))?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(cause = %err, "database connection ended");
        }
    });
    Ok(client)
}

/// One connection for the command line: the server's notices and warnings (those of
/// `install`, `watch`, ...) are printed on stderr as the CLI's own lines, `warning: ...`
/// with their detail and hint, rather than logged by the driver as its own noise.
pub async fn connect_cli(config: &DbConfig) -> Result<tokio_postgres::Client, DbError> {
    let (client, mut connection) = config
        .connect()
        .await
        .map_err(|source| DbError::connect(config, source))?;
    tokio::spawn(async move {
        // A notice arrives before the reply of its statement, and is printed before the
        // statement's caller is woken: a command's warnings come before its result.
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notice(notice)) => {
                    // Never a panic on a closed stderr (`pgfeed install 2>&- `).
                    let _ = writeln!(std::io::stderr(), "{}", notice_text(&notice));
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(cause = %err, "database connection ended");
                    break;
                }
            }
        }
    });
    Ok(client)
}

/// `severity: message`, then the detail and the hint on lines of their own; control
/// characters (a name could hold an escape sequence) are escaped.
pub fn notice_text(notice: &tokio_postgres::error::DbError) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .flat_map(|c| {
                let escaped: Vec<char> = if c.is_control() && c != '\n' {
                    c.escape_default().collect()
                } else {
                    vec![c]
                };
                escaped
            })
            .collect()
    };
    let mut text = format!(
        "{}: {}",
        notice.severity().to_lowercase(),
        clean(notice.message())
    );
    if let Some(detail) = notice.detail() {
        text.push_str(&format!("\n  detail: {}", clean(detail)));
    }
    if let Some(hint) = notice.hint() {
        text.push_str(&format!("\n  hint: {}", clean(hint)));
    }
    text
}

/// Renders a database error with PostgreSQL's message, detail and hint, for the CLI.
pub fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => {
            let mut s = db.message().to_string();
            if let Some(detail) = db.detail() {
                s.push_str("\nDETAIL: ");
                s.push_str(detail);
            }
            if let Some(hint) = db.hint() {
                s.push_str("\nHINT: ");
                s.push_str(hint);
            }
            s
        }
        None => {
            let mut s = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(cause) = source {
                s.push_str(": ");
                s.push_str(&cause.to_string());
                source = cause.source();
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_timeout_comes_first_so_the_operators_own_wins() {
        let url = Secret::new("postgres://u@h/d?options=-c%20statement_timeout%3D5s");
        let config = with_statement_timeout(&parse_url(&url).unwrap(), Duration::from_secs(30));
        let options = config.pg.get_options().unwrap();
        assert!(
            options.starts_with("-c statement_timeout=30000 "),
            "{options}"
        );
        assert!(options.contains("-c statement_timeout=5s"), "{options}");
        assert!(options.ends_with(PINNED_SEARCH_PATH), "{options}");
        let plain = with_statement_timeout(
            &parse_url(&Secret::new("postgres://u@h/d")).unwrap(),
            Duration::from_millis(1500),
        );
        assert!(
            plain
                .pg
                .get_options()
                .unwrap()
                .starts_with("-c statement_timeout=1500 -c jit=off"),
            "{:?}",
            plain.pg.get_options()
        );
    }
}
