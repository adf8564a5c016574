//! The `pgfeed` command line: flags, subcommands, and what each one does.
//!
//! Settings are loaded here (file, environment, flags) and handed to the library; output
//! meant for scripts (`token`, `status --json`) goes to stdout alone, everything else to
//! the log on stderr. This module holds no gateway logic of its own.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, Sources};
use crate::schema::{self, SchemaError, WatchSpec};
use crate::{ServeError, db};

/// A realtime gateway for PostgreSQL: row changes as tenant-filtered Server-Sent Events.
#[derive(Debug, Parser)]
#[command(name = "pgfeed", version, about)]
pub struct Cli {
    /// Configuration file (TOML); environment variables and flags override it.
    #[arg(long, global = true, value_name = "FILE", env = "PGFEED_CONFIG")]
    pub config: Option<PathBuf>,
    /// The database (overrides `database.url` and DATABASE_URL).
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Serve {
        /// Address to listen on (overrides `server.listen`).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Validate the configuration (keys, values, key files) and exit without starting.
        #[arg(long)]
        check_config: bool,
    },
    /// Install or upgrade the pgfeed schema (idempotent).
    Install,
    /// Remove the pgfeed schema, its journal and every capture trigger.
    Uninstall {
        /// Uninstall even while gateways are listening on the database (they report the
        /// schema missing until it is installed again).
        #[arg(long)]
        yes: bool,
    },
    /// Start capturing changes of a table.
    Watch {
        /// The table (`orders` or `schema.orders`; unquoted names fold to lower case,
        /// `'"Mixed Case"'` keeps its case).
        table: String,
        /// Column holding each row's tenant.
        #[arg(long, value_name = "COL")]
        tenant_column: Option<String>,
        /// Column that never leaves the database (repeatable).
        #[arg(
            long = "exclude-column",
            value_name = "COL",
            conflicts_with = "include_columns"
        )]
        exclude_columns: Vec<String>,
        /// Publish only this column, besides the key and the tenant column (repeatable);
        /// columns added later are not published.
        #[arg(long = "include-column", value_name = "COL")]
        include_columns: Vec<String>,
        /// Every subscriber may see every row of this table.
        #[arg(long)]
        public: bool,
    },
    /// Stop capturing changes of a table.
    Unwatch {
        /// The table.
        table: String,
    },
    /// Show the schema version, watched tables and journal.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Mint a development token from `auth.secret` and print it alone on stdout.
    Token {
        /// The tenant the token is for.
        #[arg(long)]
        tenant: String,
        /// Tables the token is limited to, comma-separated (needs `auth.tables_claim`).
        #[arg(long, value_delimiter = ',')]
        tables: Option<Vec<String>>,
        /// Lifetime, like `1h` or `15m`.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Try pgfeed: a throwaway PostgreSQL (unless a database is configured), a watched
    /// demo table, the gateway and a live page, with `psql` and `curl` lines to try.
    Demo {
        /// Address of the gateway (overrides `server.listen`).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Address of the live page (default: the gateway's next port).
        #[arg(long, value_name = "ADDR")]
        page_listen: Option<std::net::SocketAddr>,
        /// Lifetime of the tokens the demo mints, like `1h` or `30s`.
        #[arg(long, default_value = "1h")]
        token_ttl: String,
        /// Allow a gateway or page address that is not loopback: other machines can then
        /// reach the page, which hands out demo tokens to anyone.
        #[arg(long)]
        allow_remote: bool,
    },
}

/// A command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Settings.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Connecting.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// Schema work.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The gateway.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// `pgfeed demo`.
    #[error(transparent)]
    Demo(#[from] crate::demo::DemoError),
    /// A bad argument.
    #[error("invalid argument `{arg}`: {message}")]
    Argument {
        /// The argument.
        arg: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Starting the async runtime.
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    /// `uninstall` without `--yes` while gateways listen.
    #[error(
        "{gateways} pgfeed gateway(s) are listening on this database (see `pgfeed status`): \
         stop them first, or pass --yes to uninstall anyway (they then report the schema \
         missing until `pgfeed install` runs again)"
    )]
    GatewaysListening {
        /// How many LISTEN connections of gateways were found.
        gateways: i64,
    },
    /// Binding the listen address.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl Cli {
    fn sources(&self, listen: Option<&str>) -> Sources {
        let mut sources = Sources::from_process(self.config.clone());
        if let Some(url) = &self.database_url {
            sources.flags.push(("database.url", url.clone()));
        }
        if let Some(listen) = listen {
            sources.flags.push(("server.listen", listen.to_string()));
        }
        sources
    }
}

async fn client(config: &Config) -> Result<tokio_postgres::Client, CliError> {
    let pg = db::parse_url(config.database_url()?)?;
    Ok(db::connect_cli(&pg).await?)
}

/// Levels a bare `PGFEED_LOG` directive may name.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// The log filter `PGFEED_LOG` asks for: comma-separated directives, each a level
/// (`debug`) or `target=level` (`pgfeed=debug`, `tokio_postgres=warn`). A bare word that
/// is not a level (`verbose`, `debgu`) would silently filter on a module of that name and
/// log nothing: it is refused, as is an unknown level.
pub fn log_filter(text: &str) -> Result<tracing_subscriber::EnvFilter, ConfigError> {
    let refuse = |message: String| ConfigError::Source {
        origin: "environment variable PGFEED_LOG".into(),
        message,
    };
    if text.trim().is_empty() {
        return Ok(tracing_subscriber::EnvFilter::new("info"));
    }
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !directive.contains(['=', '[', ':']);
        if bare && !LOG_LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(refuse(format!(
                "{:?} is not a log level ({}) nor a `target=level` directive, like PGFEED_LOG=pgfeed=debug",
                directive.chars().take(64).collect::<String>(),
                LOG_LEVELS.join(", ")
            )));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(text)
        .map_err(|e| {
            refuse(format!(
                "{:?} is not a log filter ({e}); write levels ({}) or `target=level` directives, like PGFEED_LOG=pgfeed=debug",
                text.chars().take(64).collect::<String>(),
                LOG_LEVELS.join(", ")
            ))
        })
}

/// Starts logging to stderr: the filter from `PGFEED_LOG` (default `info`; an invalid one
/// is an error naming it), the format from `log.format`. Safe to call more than once (later
/// calls do nothing). Lines go through [`crate::logging`], so a broken or stalled stderr
/// never panics or blocks a task that logs.
pub fn init_logging(json: bool) -> Result<(), ConfigError> {
    let filter = match std::env::var("PGFEED_LOG") {
        Err(std::env::VarError::NotPresent) => tracing_subscriber::EnvFilter::new("info"),
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(ConfigError::Source {
                origin: "environment variable PGFEED_LOG".into(),
                message: "is not valid UTF-8".into(),
            });
        }
        Ok(text) => log_filter(&text)?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .log_internal_errors(false)
        .with_writer(crate::logging::StderrQueue);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    Ok(())
}

/// Runs the parsed command line on a runtime of `server.threads` worker threads.
pub fn run(mut cli: Cli) -> Result<(), CliError> {
    let command = cli.command.take().unwrap_or(Command::Serve {
        listen: None,
        check_config: false,
    });
    let listen = match &command {
        Command::Serve { listen, .. } | Command::Demo { listen, .. } => listen.as_deref(),
        _ => None,
    };
    let config = Config::load(&cli.sources(listen))?;
    init_logging(config.log_json)?;
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    let result = runtime.block_on(execute(&command, config));
    crate::logging::flush();
    result
}

async fn execute(command: &Command, config: Config) -> Result<(), CliError> {
    match command {
        Command::Serve {
            check_config: true, ..
        } => {
            crate::auth::Authenticator::new(&config.auth)?;
            if let Some(files) = &config.tls {
                crate::http::Tls::load(files)?;
            }
            db::parse_url(config.database_url()?)?;
            crate::logging::eprint("configuration is valid");
            Ok(())
        }
        Command::Serve { .. } => serve(config).await,
        Command::Install => {
            let mut client = client(&config).await?;
            let done = schema::install(&mut client).await?;
            if done.from == done.to {
                crate::logging::eprint(&format!(
                    "pgfeed schema is up to date (version {})",
                    done.to
                ));
            } else if done.from == 0 {
                crate::logging::eprint(&format!(
                    "installed the pgfeed schema (version {})",
                    done.to
                ));
            } else {
                crate::logging::eprint(&format!(
                    "upgraded the pgfeed schema from version {} to {}",
                    done.from, done.to
                ));
            }
            Ok(())
        }
        Command::Uninstall { yes } => {
            let mut client = client(&config).await?;
            // Gateways are seen by their LISTEN connections, as `status` lists them.
            let row = client
                .query_one(
                    "SELECT (SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_activity
                             WHERE datname OPERATOR(pg_catalog.=) pg_catalog.current_database()
                               AND application_name OPERATOR(pg_catalog.=) $1),
                            pg_catalog.to_regnamespace('pgfeed') IS NOT NULL",
                    &[&crate::listener::APPLICATION_NAME],
                )
                .await
                .map_err(SchemaError::from)?;
            let (gateways, installed): (i64, bool) = (row.get(0), row.get(1));
            if gateways > 0 && installed {
                if !*yes {
                    return Err(CliError::GatewaysListening { gateways });
                }
                crate::logging::eprint(&format!(
                    "warning: {gateways} pgfeed gateway(s) are listening on this database; they report the schema missing (/readyz 503) until `pgfeed install` runs again"
                ));
            }
            if schema::uninstall(&mut client).await? {
                // Rings every gateway's catalog reload, so that they notice at once
                // rather than at their next periodic reload.
                client
                    .execute("SELECT pg_catalog.pg_notify('pgfeed', 'watch')", &[])
                    .await
                    .map_err(SchemaError::from)?;
                crate::logging::eprint(
                    "removed the pgfeed schema, its journal and all capture triggers",
                );
            } else {
                crate::logging::eprint("the pgfeed schema was not installed; nothing to do");
            }
            Ok(())
        }
        Command::Watch {
            table,
            tenant_column,
            exclude_columns,
            include_columns,
            public,
        } => {
            let client = client(&config).await?;
            let spec = WatchSpec {
                table: table.clone(),
                tenant_column: tenant_column.clone(),
                exclude_columns: exclude_columns.clone(),
                include_columns: (!include_columns.is_empty()).then(|| include_columns.clone()),
                public: *public,
            };
            schema::watch(&client, &spec).await?;
            crate::logging::eprint(&format!("watching {table}"));
            Ok(())
        }
        Command::Unwatch { table } => {
            let client = client(&config).await?;
            schema::unwatch(&client, table).await?;
            crate::logging::eprint(&format!("no longer watching {table}"));
            Ok(())
        }
        Command::Status { json } => status(&config, *json).await,
        Command::Demo {
            listen,
            page_listen,
            token_ttl,
            allow_remote,
        } => {
            let token_ttl = humantime::parse_duration(token_ttl)
                .ok()
                .filter(|ttl| *ttl >= Duration::from_secs(1))
                .ok_or_else(|| CliError::Argument {
                    arg: "--token-ttl",
                    message: format!("{token_ttl:?} is not a duration of at least 1s, like \"1h\""),
                })?;
            let shutdown = CancellationToken::new();
            let trigger = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("shutting down");
                trigger.cancel();
            });
            let options = crate::demo::Options {
                page_listen: *page_listen,
                token_ttl,
                allow_remote: *allow_remote,
                listen_setting: if listen.is_some() {
                    "--listen"
                } else {
                    "server.listen"
                },
            };
            crate::demo::run(config, options, shutdown).await?;
            Ok(())
        }
        Command::Token {
            tenant,
            tables,
            ttl,
        } => {
            let ttl = humantime::parse_duration(ttl).map_err(|e| CliError::Argument {
                arg: "--ttl",
                message: format!("{ttl:?} is not a duration like \"1h\" ({e})"),
            })?;
            if ttl < Duration::from_secs(1) {
                return Err(CliError::Argument {
                    arg: "--ttl",
                    message: "must be at least 1s".into(),
                });
            }
            if tenant.is_empty() {
                return Err(CliError::Argument {
                    arg: "--tenant",
                    message: "must not be empty".into(),
                });
            }
            if tables.is_none()
                && config.auth.tables_claim.is_some()
                && !config.auth.tables_claim_optional
            {
                return Err(CliError::Argument {
                    arg: "--tables",
                    message: "auth.tables_claim is set, so a token without it is refused: \
                              pass --tables (or set auth.tables_claim_optional = true)"
                        .into(),
                });
            }
            for table in tables.iter().flatten() {
                crate::names::table_key(table).map_err(|e| CliError::Argument {
                    arg: "--tables",
                    message: format!("{:?} is not a table name: {e}", table),
                })?;
            }
            let token = crate::auth::mint(&config.auth, tenant, tables.as_deref(), ttl)?;
            println!("{token}");
            Ok(())
        }
    }
}

/// Raises the open-file soft limit to the hard limit (each connection is a file: under
/// systemd the soft limit is 1024) and logs both.
fn raise_open_file_limit() {
    use rlimit::Resource;
    let Ok((soft, hard)) = rlimit::getrlimit(Resource::NOFILE) else {
        return;
    };
    match rlimit::increase_nofile_limit(hard) {
        Ok(raised) if raised > soft => tracing::info!(
            soft_was = soft,
            soft = raised,
            hard,
            "raised the open-file soft limit to the hard limit"
        ),
        Ok(raised) => tracing::info!(soft = raised, hard, "open-file limit"),
        Err(err) => {
            tracing::warn!(soft, hard, cause = %err, "cannot raise the open-file soft limit")
        }
    }
}

async fn serve(config: Config) -> Result<(), CliError> {
    raise_open_file_limit();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| CliError::Bind {
            addr: config.listen,
            source,
        })?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        // Cancelled before anything else: nothing (not even the log) stands in its way.
        trigger.cancel();
        tracing::info!("shutting down");
    });
    crate::serve(config, listener, shutdown).await?;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Rows `pgfeed status` counts exactly; beyond this it reads the planner's estimate
/// (`pg_class.reltuples`), so that status stays fast on a big journal, when it is needed.
pub const STATUS_EXACT_COUNT: i64 = 10_000;

/// A row count: exact up to [`STATUS_EXACT_COUNT`], else an estimate.
#[derive(Debug, Clone, Copy)]
struct Count {
    rows: i64,
    exact: bool,
}

impl Count {
    /// From a count bounded at `STATUS_EXACT_COUNT + 1` and the table's `reltuples`
    /// (-1 or stale when it was never analyzed: then at least the bound).
    fn new(bounded: i64, estimate: f64) -> Count {
        if bounded <= STATUS_EXACT_COUNT {
            Count {
                rows: bounded,
                exact: true,
            }
        } else {
            Count {
                rows: (estimate.round() as i64).max(bounded),
                exact: false,
            }
        }
    }

    fn text(self) -> String {
        if self.exact {
            self.rows.to_string()
        } else {
            format!("~{}", self.rows)
        }
    }
}

async fn status(config: &Config, json: bool) -> Result<(), CliError> {
    let client = client(config).await?;
    let watched = schema::watched(&client).await?;
    // No count(*) over the journal: counts stop at the bound, estimates take over.
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM (SELECT FROM pgfeed.changes LIMIT $1) AS c),
                    (SELECT reltuples::float8 FROM pg_catalog.pg_class
                     WHERE oid = 'pgfeed.changes'::pg_catalog.regclass),
                    (SELECT count(*) FROM (SELECT FROM pgfeed.commits LIMIT $1) AS c),
                    (SELECT reltuples::float8 FROM pg_catalog.pg_class
                     WHERE oid = 'pgfeed.commits'::pg_catalog.regclass),
                    (SELECT min(seq) FROM pgfeed.commits), (SELECT max(seq) FROM pgfeed.commits),
                    (SELECT min(committed_at)::text FROM pgfeed.commits),
                    pg_catalog.pg_total_relation_size('pgfeed.changes')
                        + pg_catalog.pg_total_relation_size('pgfeed.commits'),
                    pg_catalog.pg_notification_queue_usage(),
                    (SELECT count(*) FROM (SELECT FROM pgfeed.pending LIMIT $1) AS c),
                    (SELECT reltuples::float8 FROM pg_catalog.pg_class
                     WHERE oid = 'pgfeed.pending'::pg_catalog.regclass)",
            &[&(STATUS_EXACT_COUNT + 1)],
        )
        .await
        .map_err(SchemaError::from)?;
    let changes = Count::new(row.get(0), row.get(1));
    // Commits recorded but not numbered yet (no gateway has read since) count too.
    let pending = Count::new(row.get(9), row.get(10));
    let numbered = Count::new(row.get(2), row.get(3));
    let commits = Count {
        rows: numbered.rows + pending.rows,
        exact: numbered.exact && pending.exact,
    };
    let (oldest, newest): (Option<i64>, Option<i64>) = (row.get(4), row.get(5));
    let oldest_at: Option<String> = row.get(6);
    let bytes: i64 = row.get(7);
    let queue: f64 = row.get(8);
    let gateways = client
        .query(
            "SELECT client_addr::text, backend_start::text FROM pg_catalog.pg_stat_activity
             WHERE datname = pg_catalog.current_database() AND application_name = $1
             ORDER BY backend_start",
            &[&crate::listener::APPLICATION_NAME],
        )
        .await
        .map_err(SchemaError::from)?;
    let gateways: Vec<(Option<String>, Option<String>)> =
        gateways.iter().map(|r| (r.get(0), r.get(1))).collect();
    if json {
        let tables: Vec<_> = watched
            .iter()
            .map(|w| {
                serde_json::json!({
                    "table": w.table, "tenant_column": w.tenant_column,
                    "exclude_columns": w.exclude_columns,
                    "include_columns": w.include_columns, "public": w.public,
                    "partitions": w.partitions, "not_capturing": w.not_capturing,
                })
            })
            .collect();
        let gateways: Vec<_> = gateways
            .iter()
            .map(|(addr, since)| serde_json::json!({ "client_addr": addr, "connected_since": since }))
            .collect();
        let out = serde_json::json!({
            "schema_version": schema::VERSION,
            "watched": tables,
            "journal": {
                "changes": changes.rows, "commits": commits.rows,
                "unnumbered_commits": pending.rows,
                // false: more than STATUS_EXACT_COUNT rows, the number is an estimate.
                "changes_exact": changes.exact, "commits_exact": commits.exact,
                "unnumbered_commits_exact": pending.exact,
                "oldest_commit": oldest, "newest_commit": newest,
                "oldest_committed_at": oldest_at, "bytes": bytes,
            },
            "gateways": gateways,
            "notification_queue_usage": queue,
        });
        println!("{out}");
        return Ok(());
    }
    println!("schema version      {}", schema::VERSION);
    println!(
        "journal             {} changes in {} commits ({}, {} not numbered yet), commits {} to {}, oldest {}",
        changes.text(),
        commits.text(),
        human_bytes(bytes),
        pending.text(),
        opt(oldest),
        opt(newest),
        oldest_at.as_deref().unwrap_or("-")
    );
    if !(changes.exact && commits.exact) {
        println!(
            "                    (~: an estimate from the planner's statistics; counted exactly up to {STATUS_EXACT_COUNT})"
        );
    }
    println!("notification queue  {:.4}% used", queue * 100.0);
    println!("gateways listening  {}", gateways.len());
    for (addr, since) in &gateways {
        println!(
            "  {} since {}",
            addr.as_deref().unwrap_or("local socket"),
            since.as_deref().unwrap_or("?")
        );
    }
    println!("watched tables      {}", watched.len());
    for w in &watched {
        let who = match &w.tenant_column {
            Some(col) => format!("tenant column {col}"),
            None => "public".to_string(),
        };
        let mut notes = String::new();
        if !w.exclude_columns.is_empty() {
            notes.push_str(&format!(", excluding {}", w.exclude_columns.join(", ")));
        }
        if let Some(include) = &w.include_columns {
            notes.push_str(&format!(", only {}", include.join(", ")));
        }
        if !w.partitions.is_empty() {
            notes.push_str(&format!(", {} partitions", w.partitions.len()));
        }
        println!("  {}  ({who}{notes})", w.table);
        if !w.not_capturing.is_empty() {
            println!(
                "    NOT CAPTURING {}: capture triggers missing or disabled (run `pgfeed watch` again)",
                w.not_capturing.join(", ")
            );
        }
    }
    Ok(())
}

fn human_bytes(n: i64) -> String {
    let n = n as f64;
    if n >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", n / (1024.0 * 1024.0 * 1024.0))
    } else if n >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / (1024.0 * 1024.0))
    } else {
        format!("{:.0} KiB", n / 1024.0)
    }
}

fn opt(v: Option<i64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}
