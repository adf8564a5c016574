//! pgfeed: a realtime gateway for PostgreSQL.
//!
//! SQL triggers journal every change to watched tables and ring a NOTIFY doorbell at
//! commit; one LISTEN connection ([`listener`]) reads the announced changes from the
//! journal ([`journal`]) and publishes them to per-tenant broadcast channels ([`hub`]);
//! each subscriber's Server-Sent Events stream ([`session`]) replays what it missed and then
//! follows the live feed. [`serve`] runs the whole gateway; `main.rs` is a thin wrapper.

pub mod admission;
pub mod auth;
pub mod catalog;
pub mod change;
pub mod cli;
#[cfg(feature = "demo")]
pub mod cluster;
pub mod config;
pub mod db;
#[cfg(feature = "demo")]
pub mod demo;
pub mod filter;
pub mod frame;
pub mod http;
pub mod hub;
pub mod journal;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod names;
pub mod pgtls;
mod rawconn;
pub mod recent;
pub mod rowfilter;
pub mod schema;
pub mod session;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A setting is missing or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database could not be reached.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// No pooled connection could be opened.
    #[error("cannot connect to PostgreSQL at {endpoint}")]
    Pool {
        /// `host:port/dbname`, never the credentials.
        endpoint: String,
        /// Why.
        #[source]
        source: deadpool_postgres::PoolError,
    },
    /// The schema is missing or of another version.
    #[error(transparent)]
    Schema(#[from] schema::SchemaError),
    /// The journal's head could not be read.
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    /// The watched tables could not be read.
    #[error("cannot read the watched tables")]
    Catalog(#[from] db::QueryError),
    /// An essential task (the listener, pruning) ended while the gateway was serving.
    #[error("the {task} task ended unexpectedly ({cause}); the gateway stopped")]
    TaskFailed {
        /// Which task.
        task: &'static str,
        /// Its panic message, or how it ended.
        cause: String,
    },
}

/// Runs the gateway on `listener` until `shutdown` is cancelled, then ends every stream
/// and waits up to `server.shutdown_grace` for connections to close.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    // Phase 1: settings that need no database.
    let auth = auth::Authenticator::start(&config.auth).await?;
    let tls = config
        .server
        .tls()
        .as_ref()
        .map(http::Tls::load)
        .transpose()?;

    // Phase 2: the database, the schema version and the journal's head.
    let pg = db::parse_url(config.database_url()?)?;
    let pooled = db::with_statement_timeout(&pg, config.database.query_timeout);
    let pool = db::pool(&pooled, config.database.pool_size)?;
    {
        let client = pool.get().await.map_err(|err| match err {
            // The driver's own error, once, with where it tried (deadpool's wrapper
            // repeats it and names no host).
            deadpool_postgres::PoolError::Backend(source) => {
                ServeError::Db(db::DbError::connect(&pg, source))
            }
            other => ServeError::Pool {
                endpoint: db::endpoint(&pg),
                source: other,
            },
        })?;
        schema::check(&client).await?;
    }
    let limits = journal::Limits::new(&config.journal, &config.database);
    let journal = journal::Journal::new(pool, limits);
    // The listener reads on a connection of its own, outside the pool that subscribers'
    // replays, `/v1/position` and `/metrics` share: its reads never wait behind theirs.
    let listener_journal = journal::Journal::new(db::pool(&db::reader_config(&pooled), 1)?, limits);
    let head = journal.head().await?;
    let catalog = Arc::new(catalog::Catalog::default());
    catalog.reload(journal.db()).await?;
    let hub = Arc::new(
        hub::Hub::new(
            head,
            config.server.live_buffer,
            admission::Limits::from(&config.server),
        )
        .with_recent_bytes(config.server.replay_memory),
    );

    let metrics = Arc::new(metrics::Metrics::new());

    // Phase 3: the listener, which catches up from `head` once connected, and pruning.
    // Both are essential: if either ends before shutdown (a panic), the gateway would
    // serve without delivering or without pruning, so it stops instead (below).
    let tracker = TaskTracker::new();
    let readiness = Arc::new(listener::Readiness::default());
    let listener_task = listener::Listener {
        config: db::listener_config(&pg),
        journal: listener_journal,
        hub: Arc::clone(&hub),
        readiness: Arc::clone(&readiness),
        health_interval: config.database.health_interval,
        catalog: Arc::clone(&catalog),
        metrics: Arc::clone(&metrics),
    }
    .run(shutdown.child_token());
    let mut listener_task = tokio::spawn(tracker.track_future(with_test_panic(listener_task)));
    let mut prune_task = tokio::spawn(tracker.track_future(journal.clone().prune_periodically(
        config.journal.retention,
        config.journal.prune_interval,
        Arc::clone(&metrics),
        shutdown.child_token(),
    )));

    // Phase 4: HTTP, until shutdown.
    let state = Arc::new(http::AppState {
        hub,
        journal,
        auth,
        tenant_param: config.auth.mode == config::AuthMode::None,
        catalog,
        cors_origins: config.cors.allowed_origins.clone(),
        metrics,
        readiness: Arc::clone(&readiness),
        stream: session::StreamSettings::from(&config.server),
        shutdown: shutdown.child_token(),
        connections: Arc::new(http::Connections::new(
            &config.server,
            config.database.pool_size,
        )),
        tls,
        h2c: config.server.h2c,
    });
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        commit = crate::cli::COMMIT,
        listen = %listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
        auth_mode = config.auth.mode.as_str(),
        tls = state.tls.is_some(),
        h2c = state.h2c,
        database = %db::endpoint(&pg),
        position = %head,
        max_connections = state.connections.max,
        "pgfeed serving"
    );
    let essential = async {
        tokio::select! {
            ended = &mut listener_task => ("listener", ended),
            ended = &mut prune_task => ("journal pruning", ended),
        }
    };
    let failed = tokio::select! {
        () = http::run(listener, state, shutdown.clone(), &tracker) => None,
        (task, ended) = essential => (!shutdown.is_cancelled()).then(|| {
            let cause = match ended {
                Ok(()) => "it returned".to_string(),
                Err(err) => match err.try_into_panic() {
                    Ok(panic) => panic_message(&*panic),
                    Err(err) => err.to_string(),
                },
            };
            // Not ready at once, then every stream is ended (clients reconnect to another
            // replica) and the process exits non-zero so that its supervisor restarts it.
            readiness.fail();
            tracing::error!(task, cause = %cause, "an essential task ended unexpectedly; shutting down");
            shutdown.cancel();
            ServeError::TaskFailed { task, cause }
        }),
    };

    // Phase 5: drain.
    tracker.close();
    if tokio::time::timeout(config.server.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = %humantime::format_duration(config.server.shutdown_grace), "connections still open after the shutdown grace; exiting anyway");
    }
    match failed {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// A panic's message, if it has one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(text), _) => format!("panicked: {text}"),
        (_, Some(text)) => format!("panicked: {text}"),
        _ => "panicked".to_string(),
    }
}

/// The test suite's way to make the listener task panic: with
/// `PGFEED_TEST_LISTENER_PANIC_AFTER` set to a duration (`"2s"`), the task panics that
/// long after start-up, as a bug in it would. Only `PGFEED_TEST_*` variables do this;
/// the configuration ignores them.
async fn with_test_panic(task: impl std::future::Future<Output = ()>) {
    let after = std::env::var("PGFEED_TEST_LISTENER_PANIC_AFTER")
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok());
    match after {
        None => task.await,
        Some(after) => {
            tokio::select! {
                () = task => {}
                () = tokio::time::sleep(after) => panic!("injected by PGFEED_TEST_LISTENER_PANIC_AFTER"),
            }
        }
    }
}
