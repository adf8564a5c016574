//! Connections to the application's database: parsing the URL, the pool for ordinary
//! queries, and single connections for the CLI and the listener.
//!
//! Everything that opens a connection goes through here so that keepalives and the
//! application name are set in one place. This module runs no pgfeed queries itself.

use std::io::Write as _;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::config::Secret;

/// A connection problem.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// `database.url` could not be parsed.
    #[error("invalid setting `database.url`: {0}")]
    Url(#[source] tokio_postgres::Error),
    /// Connecting failed.
    #[error("cannot connect to PostgreSQL at {endpoint}")]
    Connect {
        /// `host:port/dbname` ([`endpoint`]), never the credentials.
        endpoint: String,
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
pub fn parse_url(url: &Secret) -> Result<tokio_postgres::Config, DbError> {
    let mut config: tokio_postgres::Config = url.expose().parse().map_err(DbError::Url)?;
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
    pin_search_path(&mut config);
    Ok(config)
}

/// Where `config` connects, as `host:port/dbname` (never the user's password), for logs.
pub fn endpoint(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
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
pub fn with_statement_timeout(
    config: &tokio_postgres::Config,
    timeout: Duration,
) -> tokio_postgres::Config {
    let mut config = config.clone();
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128);
    let options = match config.get_options() {
        Some(rest) => format!("-c statement_timeout={ms} {rest}"),
        None => format!("-c statement_timeout={ms}"),
    };
    config.options(&options);
    config
}

/// The pool for journal reads and other short queries.
pub fn pool(config: &tokio_postgres::Config, size: usize) -> Result<Pool, DbError> {
    let manager = Manager::from_config(
        config.clone(),
        NoTls,
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
pub async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, DbError> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|source| DbError::Connect {
            endpoint: endpoint(config),
            source,
        })?;
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
pub async fn connect_cli(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, DbError> {
    let (client, mut connection) =
        config
            .connect(NoTls)
            .await
            .map_err(|source| DbError::Connect {
                endpoint: endpoint(config),
                source,
            })?;
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
        let options = config.get_options().unwrap();
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
                .get_options()
                .unwrap()
                .starts_with("-c statement_timeout=1500 -c jit=off"),
            "{:?}",
            plain.get_options()
        );
    }
}
