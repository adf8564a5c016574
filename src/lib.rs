//! pgfeed: a realtime gateway for PostgreSQL.
//!
//! SQL triggers journal every change to watched tables and ring a NOTIFY doorbell at
//! commit; one LISTEN connection ([`listener`]) reads the announced changes from the
//! journal ([`journal`]) and publishes them to per-tenant broadcast channels ([`fanout`]);
//! each subscriber's Server-Sent Events stream ([`sse`]) replays what it missed and then
//! follows the live feed. [`serve`] runs the whole gateway; `main.rs` is a thin wrapper.

pub mod auth;
pub mod catalog;
pub mod change;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod db;
pub mod demo;
pub mod fanout;
pub mod filter;
pub mod http;
pub mod journal;
pub mod listener;
pub mod metrics;
pub mod names;
pub mod rowfilter;
pub mod schema;
pub mod sse;
mod streamconn;

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
    #[error("cannot connect to PostgreSQL: {0}")]
    Pool(#[source] deadpool_postgres::PoolError),
    /// The schema is missing or of another version.
    #[error(transparent)]
    Schema(#[from] schema::SchemaError),
    /// The journal's head could not be read.
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
}

/// Runs the gateway on `listener` until `shutdown` is cancelled, then ends every stream
/// and waits up to `server.shutdown_grace` for connections to close.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    // Phase 1: settings that need no database.
    let auth = auth::Authenticator::new(&config.auth)?;

    // Phase 2: the database, the schema version and the journal's head.
    let pg = db::parse_url(config.database_url()?)?;
    let pool = db::pool(&pg, config.pool_size)?;
    {
        let client = pool.get().await.map_err(ServeError::Pool)?;
        schema::check(&client).await?;
    }
    let journal = journal::Journal::new(
        pool,
        journal::Limits {
            batch_size: config.batch_size,
            batch_bytes: config.batch_bytes,
            query_timeout: config.query_timeout,
        },
    );
    let head = journal.head().await?;
    let catalog = Arc::new(catalog::Catalog::default());
    catalog.reload(&journal).await?;
    let hub = Arc::new(
        fanout::Hub::new(
            head,
            config.live_buffer,
            fanout::Limits {
                max_total: config.max_subscribers,
                max_per_tenant: config.max_subscribers_per_tenant,
                rate_per_tenant: config.max_stream_rate,
            },
        )
        .with_recent_bytes(config.replay_memory),
    );

    let metrics = Arc::new(metrics::Metrics::new());

    // Phase 3: the listener, which catches up from `head` once connected.
    let tracker = TaskTracker::new();
    let readiness = Arc::new(listener::Readiness::default());
    tracker.spawn(
        listener::Listener {
            config: listener::connection_config(&pg),
            journal: journal.clone(),
            hub: Arc::clone(&hub),
            readiness: Arc::clone(&readiness),
            health_interval: config.health_interval,
            catalog: Arc::clone(&catalog),
            metrics: Arc::clone(&metrics),
        }
        .run(shutdown.child_token()),
    );

    tracker.spawn(journal.clone().prune_periodically(
        config.retention,
        config.prune_interval,
        Arc::clone(&metrics),
        shutdown.child_token(),
    ));

    // Phase 4: HTTP, until shutdown.
    let state = Arc::new(http::AppState {
        hub,
        journal,
        auth,
        tenant_param: config.auth.mode == config::AuthMode::None,
        catalog,
        cors_origins: config.cors_origins.clone(),
        metrics,
        readiness,
        stream: sse::StreamSettings {
            heartbeat: config.heartbeat,
            retry: config.retry,
        },
        shutdown: shutdown.child_token(),
    });
    tracing::info!(listen = %listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), position = %head, "pgfeed serving");
    http::run(listener, state, shutdown, &tracker).await;

    // Phase 5: drain.
    tracker.close();
    if tokio::time::timeout(config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?config.shutdown_grace, "connections still open after the shutdown grace; exiting anyway");
    }
    Ok(())
}
