//! Where the benchmark's database is: the library's throwaway cluster with the
//! benchmark's settings, a given server, or a fresh database on it; connections with
//! pgfeed's pinned `search_path`; the schema and the watched benchmark table.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use pgfeed::cluster::{Cluster, Search};

use crate::TABLE;
use crate::cli::Args;
use crate::floor::FLOOR_CHANNEL;

/// Starts the library's throwaway cluster with the benchmark's settings: durable unless
/// `fsync` is false (later lines of postgresql.auto.conf override the cluster's own
/// non-durable defaults), room for many connections, and the `--pg-conf` lines.
pub(crate) fn start_cluster(fsync: bool, extra: &[String]) -> Result<Cluster> {
    let durable = if fsync { "on" } else { "off" };
    let mut conf = format!(
        "fsync = {durable}\nsynchronous_commit = {durable}\nfull_page_writes = {durable}\n\
         max_connections = 300\nshared_buffers = 256MB\nmax_wal_size = 4GB\n"
    );
    for line in extra {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| anyhow!("--pg-conf {line:?} is not KEY=VALUE"))?;
        conf.push_str(&format!(
            "{} = '{}'\n",
            k.trim(),
            v.trim().trim_matches('\'')
        ));
    }
    Cluster::start_with(&Search::local(), &conf)
        .map_err(|e| anyhow!("{e} (or pass --database-url)"))
}

pub(crate) fn cluster_url(cluster: &Cluster, db: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{}/{db}", cluster.port())
}

/// Where the benchmark's database is.
pub(crate) struct Database {
    pub(crate) url: String,
    pub(crate) cluster: Option<Cluster>,
    /// A database this run created on a given server, dropped at the end: (admin url, name).
    pub(crate) created: Option<(String, String)>,
}

/// `url` with its database name replaced (URL form only).
pub(crate) fn with_dbname(url: &str, db: &str) -> Result<String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        bail!("--fresh-database needs a postgres:// URL");
    }
    let (base, params) = url
        .split_once('?')
        .map_or((url, None), |(b, p)| (b, Some(p)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let prefix = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    Ok(match params {
        Some(p) => format!("{prefix}/{db}?{p}"),
        None => format!("{prefix}/{db}"),
    })
}

/// A config for `url` (its `sslmode` and `sslrootcert` too) with pgfeed's pinned
/// `search_path`.
pub(crate) fn pinned(url: &str) -> Result<pgfeed::db::DbConfig> {
    let mut config = pgfeed::db::DbConfig::parse(url).context("parsing the database URL")?;
    pgfeed::db::pin_search_path(&mut config.pg);
    Ok(config)
}

pub(crate) async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = pinned(url)?
        .connect()
        .await
        .with_context(|| "connecting to PostgreSQL".to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

impl Database {
    pub(crate) async fn open(args: &Args, fsync: bool) -> Result<Database> {
        match &args.database_url {
            Some(url) if args.fresh_database => {
                let name = format!("pgfeed_bench_{}", std::process::id());
                let admin = connect(url).await?;
                admin
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .with_context(|| format!("creating database {name}"))?;
                Ok(Database {
                    url: with_dbname(url, &name)?,
                    cluster: None,
                    created: Some((url.clone(), name)),
                })
            }
            Some(url) => Ok(Database {
                url: url.clone(),
                cluster: None,
                created: None,
            }),
            None => {
                let extra = args.pg_conf.clone();
                let cluster =
                    tokio::task::spawn_blocking(move || start_cluster(fsync, &extra)).await??;
                let admin = connect(&cluster.url()).await?;
                admin.batch_execute("CREATE DATABASE pgfeed_bench").await?;
                Ok(Database {
                    url: cluster_url(&cluster, "pgfeed_bench"),
                    cluster: Some(cluster),
                    created: None,
                })
            }
        }
    }

    pub(crate) async fn close(self) {
        if let Some((admin, name)) = &self.created
            && let Ok(client) = connect(admin).await
        {
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
        if let Some(cluster) = self.cluster {
            let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
        }
    }

    pub(crate) fn postmaster_pid(&self) -> Option<u32> {
        self.cluster.as_ref().and_then(Cluster::postmaster_pid)
    }

    /// The directory holding the cluster, when the tool started it: on the database's
    /// disk. With `--database-url` the tool cannot know that disk.
    pub(crate) fn disk_dir(&self) -> Option<PathBuf> {
        self.cluster.as_ref().map(|c| c.dir().to_path_buf())
    }
}

/// Installs the schema and (re)creates the watched benchmark table. With `floor`, the
/// table also rings a raw NOTIFY at every insert statement, carrying the statement's send
/// time, for the raw LISTEN client ([`Floor`]): what a design with a NOTIFY from every
/// commit would deliver at best. pgfeed itself sends no NOTIFY per commit (only to wake a
/// sleeping gateway), so the floor is measured this way since schema 5.
pub(crate) async fn setup_table(url: &str, floor: bool) -> Result<()> {
    let mut client = connect(url).await?;
    pgfeed::schema::install(&mut client)
        .await
        .context("installing the pgfeed schema")?;
    client
        .batch_execute(&format!(
            "SELECT pgfeed.unwatch(tbl) FROM pgfeed.watched WHERE tbl = to_regclass('public.{TABLE}');
             DROP TABLE IF EXISTS public.{TABLE};
             CREATE TABLE public.{TABLE} (seq bigint PRIMARY KEY, tenant text NOT NULL,
                                          sent_us bigint NOT NULL, pad text);
             SELECT pgfeed.watch('public.{TABLE}', 'tenant');"
        ))
        .await
        .context("creating and watching the benchmark table")?;
    if floor {
        client
            .batch_execute(&format!(
                "CREATE OR REPLACE FUNCTION public.{TABLE}_floor() RETURNS trigger
                 LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
                 BEGIN
                     PERFORM pg_notify('{FLOOR_CHANNEL}', (SELECT min(sent_us) FROM new_rows)::text);
                     RETURN NULL;
                 END $$;
                 CREATE TRIGGER {TABLE}_floor AFTER INSERT ON public.{TABLE}
                     REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
                     EXECUTE FUNCTION public.{TABLE}_floor();"
            ))
            .await
            .context("creating the raw NOTIFY of the floor")?;
    }
    Ok(())
}
