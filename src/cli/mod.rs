//! The `pgfeed` command line: flags, subcommands, and what each one does.
//!
//! Settings are loaded here (file, environment, flags) and handed to the library; output
//! meant for scripts (`token`, `status --json`) goes to stdout alone, everything else to
//! the log on stderr. This module holds no gateway logic of its own.

#[cfg(feature = "demo")]
mod demo;
mod serve;
mod status;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError, Sources};
use crate::logging::init_logging;
use crate::schema::{self, SchemaError, WatchSpec};
use crate::{ServeError, db};
use serve::serve;
pub use status::STATUS_EXACT_COUNT;
use status::status;

/// `pgfeed --version`: the package version and the git commit it was built from (build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("BUILD_GIT_COMMIT"),
    ")"
);

/// The git commit the binary was built from (12 hex digits, or `unknown`).
pub const COMMIT: &str = env!("BUILD_GIT_COMMIT");

/// A realtime gateway for PostgreSQL: row changes as tenant-filtered Server-Sent Events.
///
/// Without a subcommand it prints this help and exits with status 2: the gateway runs
/// only with an explicit `pgfeed serve`.
#[derive(Debug, Parser)]
#[command(name = "pgfeed", version = VERSION, about, arg_required_else_help = true)]
pub struct Cli {
    /// Configuration file (TOML); environment variables and flags override it.
    #[arg(long, global = true, value_name = "FILE", env = "PGFEED_CONFIG")]
    pub config: Option<PathBuf>,
    /// The database (overrides `database.url` and DATABASE_URL).
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
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
    /// Stop capturing changes of a table (one that is not watched is left as it is).
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
    #[cfg(feature = "demo")]
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
    /// Print a completion script for a shell on stdout (reads no configuration), e.g.
    /// `pgfeed completions bash > /etc/bash_completion.d/pgfeed`.
    Completions {
        /// The shell.
        shell: Shell,
    },
}

/// The shells `pgfeed completions` writes scripts for.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Shell {
    /// Bash.
    Bash,
    /// Zsh.
    Zsh,
    /// Fish.
    Fish,
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
    #[cfg(feature = "demo")]
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
    /// Writing the output meant for stdout.
    #[error("cannot write to stdout")]
    Stdout(#[source] std::io::Error),
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

/// Writes the completion script for `shell` on stdout.
fn completions(shell: Shell) -> Result<(), CliError> {
    use clap::CommandFactory;
    use clap_complete::Shell as S;
    use std::io::Write;
    let shell = match shell {
        Shell::Bash => S::Bash,
        Shell::Zsh => S::Zsh,
        Shell::Fish => S::Fish,
    };
    // Into a buffer first: `generate` panics on a failed write (`| head`), this reports it.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "pgfeed", &mut script);
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&script).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(CliError::Stdout(e)),
        _ => Ok(()),
    }
}

async fn client(config: &Config) -> Result<tokio_postgres::Client, CliError> {
    let pg = db::parse_url(config.database_url()?)?;
    Ok(db::connect_cli(&pg).await?)
}

/// Runs the parsed command line on a runtime of `server.threads` worker threads.
pub fn run(cli: Cli) -> Result<(), CliError> {
    let command = &cli.command;
    if let Command::Completions { shell } = command {
        // Before the configuration: a broken config file must not stop it.
        return completions(*shell);
    }
    let listen = match command {
        Command::Serve { listen, .. } => listen.as_deref(),
        #[cfg(feature = "demo")]
        Command::Demo { listen, .. } => listen.as_deref(),
        _ => None,
    };
    let config = Config::load(&cli.sources(listen))?;
    init_logging(&config.log)?;
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.server.threads)
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    let result = runtime.block_on(execute(command, config));
    crate::logging::flush();
    result
}

async fn execute(command: &Command, config: Config) -> Result<(), CliError> {
    match command {
        Command::Serve {
            check_config: true, ..
        } => {
            crate::auth::Authenticator::start(&config.auth).await?;
            if let Some(files) = config.server.tls() {
                crate::http::Tls::load(&files)?;
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
                    &[&crate::db::LISTENER_APPLICATION_NAME],
                )
                .await
                .map_err(SchemaError::from)?;
            let gateways: i64 = row.try_get(0).map_err(SchemaError::from)?;
            let installed: bool = row.try_get(1).map_err(SchemaError::from)?;
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
            if schema::unwatch(&client, table).await? {
                crate::logging::eprint(&format!("no longer watching {table}"));
            } else {
                crate::logging::eprint(&format!("{table} is not watched; nothing to do"));
            }
            Ok(())
        }
        Command::Status { json } => status(&config, *json).await,
        // Handled by `run`, before the configuration is read.
        Command::Completions { .. } => Ok(()),
        #[cfg(feature = "demo")]
        Command::Demo {
            listen,
            page_listen,
            token_ttl,
            allow_remote,
        } => {
            demo::run(
                config,
                listen.is_some(),
                *page_listen,
                token_ttl,
                *allow_remote,
            )
            .await
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
