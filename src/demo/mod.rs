//! `pgfeed demo`: the first run. With no database configured it starts a throwaway
//! PostgreSQL ([`crate::cluster`]); then it installs the schema, creates and watches a demo
//! table, runs the gateway and a small live page ([`app`]) side by side, and prints the
//! `psql` and `curl` lines to try.
//!
//! The gateway it runs is the ordinary one ([`crate::serve`]) with the configured
//! settings; the demo only fills in what a first run lacks (a database, an HS256 secret,
//! the page's origin in `cors.allowed_origins`), and reads its tokens through claims of its
//! own ([`app::TENANT_CLAIM`], [`app::TABLES_CLAIM`]), so that the tokens its page hands
//! out see only the demo table and are refused by any other gateway, even one that shares
//! the configured secret. It listens on loopback addresses only, unless told otherwise
//! (`--allow-remote`). When it stops it stops everything it started, and removes the
//! throwaway cluster. It never alters a table of yours: with a database configured it only
//! creates `demo_orders` (and its touch trigger) if absent.

pub mod app;
mod banner;
mod net;
mod table;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{AuthMode, Config, ConfigError, Secret};
use crate::schema::{self, SchemaError, WatchSpec};
use crate::{ServeError, db};

use crate::cluster::{Cluster, ClusterError, Search};
use banner::{Banner, print_banner, psql_target};
use net::{bind, browser_addr, default_page_addr, local_only, page_origins};
use table::create_table;

/// What the command line adds to the settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the live page listens; default: the gateway's address with the next port
    /// (any free port when the gateway's is 0).
    pub page_listen: Option<SocketAddr>,
    /// Lifetime of the tokens the demo mints (printed for `curl`, handed to the page).
    pub token_ttl: Duration,
    /// Whether the gateway and the page may listen on addresses other machines can reach
    /// (`--allow-remote`); without it such an address is refused.
    pub allow_remote: bool,
    /// Where the gateway's address came from, for the message that refuses it:
    /// `--listen` or `server.listen`.
    pub listen_setting: &'static str,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A setting the demo cannot work with.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The throwaway cluster.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// Connecting to the database.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// Installing the schema or watching the table.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// Creating the demo table.
    #[error("creating the demo table demo_orders: {message}")]
    Table {
        /// PostgreSQL's message, detail and hint.
        message: String,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The gateway.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// An address other machines could reach, without `--allow-remote`.
    #[error(
        "{setting} {addr} is not a loopback address: the demo's {what} would be reachable \
         from other machines, and its page hands out tokens to whoever reaches it; use \
         127.0.0.1, or pass --allow-remote to listen there anyway"
    )]
    Remote {
        /// The address.
        addr: SocketAddr,
        /// The flag or key that set it.
        setting: &'static str,
        /// `gateway` or `live page`.
        what: &'static str,
    },
    /// An address could not be bound.
    #[error("cannot listen on {addr} for the {what}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// `gateway` or `live page (choose another with --page-listen)`.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A background task panicked.
    #[error("the demo's {what} task failed")]
    Task {
        /// Which one.
        what: &'static str,
        /// The panic.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Runs the demo until `shutdown` is cancelled, then stops the gateway and the page and
/// removes the throwaway cluster, if it started one.
pub async fn run(
    mut config: Config,
    options: Options,
    shutdown: CancellationToken,
) -> Result<(), DemoError> {
    // Phase 1: settings, and both ports, before the slow work, so that a taken port fails
    // at once.
    prepare_auth(&mut config)?;
    let page_addr = options
        .page_listen
        .unwrap_or_else(|| default_page_addr(config.server.listen));
    if !options.allow_remote {
        local_only(config.server.listen, options.listen_setting, "gateway")?;
        // A page address derived from the gateway's is loopback when that one is.
        local_only(page_addr, "--page-listen", "live page")?;
    }
    let gateway_listener = bind(config.server.listen, "gateway").await?;
    let page_listener = bind(page_addr, "live page (choose another with --page-listen)").await?;
    let page_addr = page_listener
        .local_addr()
        .map_err(|source| DemoError::Bind {
            addr: page_addr,
            what: "live page",
            source,
        })?;
    config
        .cors
        .allowed_origins
        .extend(page_origins(page_addr, &config.cors.allowed_origins));
    if !config.server.listen.ip().is_loopback() {
        tracing::warn!(gateway = %config.server.listen, "--allow-remote: other machines can reach the demo's gateway");
    }
    if !page_addr.ip().is_loopback() {
        tracing::warn!(
            page = %page_addr,
            "--allow-remote: other machines can reach the demo page, which hands out tokens \
             for the demo table to whoever reaches it, under any host name"
        );
    }

    // Phase 2: the database, throwaway unless one is configured.
    let mut throwaway = None;
    let url = match config.database.url.as_ref() {
        Some(url) => url.expose().to_string(),
        None => {
            eprintln!("No database configured: starting a throwaway PostgreSQL...");
            let cluster = tokio::task::spawn_blocking(|| Cluster::start(&Search::local()))
                .await
                .map_err(|source| DemoError::Task {
                    what: "cluster start",
                    source,
                })??;
            let url = cluster.url();
            throwaway = Some(cluster);
            config.database.url = Some(Secret::new(url.clone()));
            url
        }
    };
    let result = run_with_database(
        config,
        &options,
        gateway_listener,
        page_listener,
        &url,
        throwaway.as_ref(),
        shutdown,
    )
    .await;
    if let Some(cluster) = throwaway {
        let dir = cluster.dir().display().to_string();
        let stopped = tokio::task::spawn_blocking(move || cluster.stop())
            .await
            .map_err(|source| DemoError::Task {
                what: "cluster stop",
                source,
            })
            .and_then(|r| r.map_err(DemoError::from));
        match (&result, stopped) {
            (_, Ok(())) => eprintln!("Stopped and removed the throwaway PostgreSQL ({dir})."),
            (Ok(()), Err(err)) => return Err(err),
            (Err(_), Err(err)) => {
                tracing::warn!(cause = %err, "stopping the throwaway PostgreSQL failed")
            }
        }
    }
    result
}

async fn run_with_database(
    config: Config,
    options: &Options,
    gateway_listener: TcpListener,
    page_listener: TcpListener,
    url: &str,
    throwaway: Option<&Cluster>,
    shutdown: CancellationToken,
) -> Result<(), DemoError> {
    if shutdown.is_cancelled() {
        // Ctrl-C while the throwaway cluster was starting.
        return Ok(());
    }
    let pg = db::parse_url(config.database_url()?)?;
    // Install's warnings (a role without CREATEROLE, ...) as the CLI's own lines.
    let mut client = db::connect_cli(&pg).await?;
    schema::install(&mut client).await?;
    let created = create_table(&mut client).await?;
    schema::watch(
        &client,
        &WatchSpec {
            table: app::TABLE.into(),
            tenant_column: Some("tenant".into()),
            ..WatchSpec::default()
        },
    )
    .await?;
    drop(client);
    if !created {
        tracing::info!("using the existing table demo_orders");
    }

    let gateway_addr = gateway_listener
        .local_addr()
        .expect("a bound listener has an address");
    let page_addr = page_listener
        .local_addr()
        .expect("a bound listener has an address");
    let psql = psql_target(url, throwaway.is_some());
    let app = Arc::new(app::App {
        pool: db::pool(&pg, 2)?,
        auth: config.auth.clone(),
        token_ttl: options.token_ttl,
        gateway: (!gateway_addr.ip().is_unspecified())
            .then(|| format!("http://{}", browser_addr(gateway_addr))),
        gateway_port: gateway_addr.port(),
        psql: psql.clone(),
        page_port: page_addr.port(),
        loopback_only: page_addr.ip().is_loopback(),
    });
    let curl_token = crate::auth::mint(
        &config.auth,
        app::TENANTS[0],
        Some(&[app::TABLE.to_string()]),
        options.token_ttl,
    )?;

    let gateway = tokio::spawn(crate::serve(
        config.clone(),
        gateway_listener,
        shutdown.child_token(),
    ));
    let page = tokio::spawn(app::run(page_listener, app, shutdown.child_token()));

    let database = match throwaway {
        Some(cluster) => format!(
            "{url}  (throwaway cluster in {}; removed when the demo stops)",
            cluster.dir().display()
        ),
        None => format!(
            "{psql}  (demo_orders {})",
            if created { "created" } else { "found" }
        ),
    };
    print_banner(&Banner {
        page: format!("http://{}/", browser_addr(page_addr)),
        gateway: format!("http://{}", browser_addr(gateway_addr)),
        database,
        psql,
        token: curl_token,
        token_ttl: options.token_ttl,
    });

    // Until Ctrl-C, or until the gateway gives up on its own.
    let mut gateway = gateway;
    let served = tokio::select! {
        _ = shutdown.cancelled() => None,
        result = &mut gateway => Some(result),
    };
    shutdown.cancel();
    let served = match served {
        Some(result) => result,
        None => gateway.await,
    };
    let paged = page.await;
    served.map_err(|source| DemoError::Task {
        what: "gateway",
        source,
    })??;
    paged.map_err(|source| DemoError::Task {
        what: "live page",
        source,
    })?;
    Ok(())
}

/// The demo mints tokens, so it needs an HS256 secret: the configured one, or a random one
/// for this run. Its gateway reads the demo's own claims, which no other gateway reads: a
/// token its page mints with the configured secret names no tenant anywhere else.
fn prepare_auth(config: &mut Config) -> Result<(), DemoError> {
    let auth = &mut config.auth;
    if auth.mode != AuthMode::Jwt {
        return Err(ConfigError::Invalid {
            key: "auth.mode",
            message: "`pgfeed demo` mints tokens, so it needs \"jwt\" (the default)".into(),
        }
        .into());
    }
    if auth.public_key_file.is_some() || auth.jwks_file.is_some() || auth.jwks_url.is_some() {
        return Err(ConfigError::Invalid {
            key: "auth.secret",
            message: "`pgfeed demo` mints HS256 tokens, so it needs auth.secret rather than \
                      auth.public_key_file, auth.jwks_file or auth.jwks_url"
                .into(),
        }
        .into());
    }
    if auth.secret.is_none() {
        let bytes: [u8; 32] = rand::random();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        auth.secret = Some(Secret::new(hex));
    }
    auth.tenant_claim = app::TENANT_CLAIM.into();
    auth.tables_claim = Some(app::TABLES_CLAIM.into());
    Ok(())
}
