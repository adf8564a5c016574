//! The command line: presets (smoke, a to e) and flags, resolved into the [`Params`] of
//! one invocation.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, ValueEnum};

/// A scenario of BENCHMARKS.md, whose settings are the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Preset {
    /// A few subscribers, a few hundred changes, a few seconds (CI).
    Smoke,
    /// 1 000 subscribers over 100 tenants; 1 000 single-row commits/s for 20 s.
    A,
    /// 10 000 subscribers over 1 000 tenants; 50-row commits at the highest rate.
    B,
    /// 100 subscribers of one tenant; 50-row commits of that tenant at the highest rate.
    C,
    /// 50 000 idle streams held for 60 s: memory per stream.
    D,
    /// Write-path cost with pgbench: watched versus unwatched table.
    E,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum GatewayMode {
    /// `pgfeed serve` as a child process: its RSS and CPU are its own.
    Process,
    /// `pgfeed::serve` on its own runtime inside this process (RSS includes the bench).
    InProcess,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum OnOff {
    On,
    Off,
}

/// pgfeed's benchmark: latency, deliveries per second, memory per stream and write-path
/// cost against a real PostgreSQL, compared with a raw LISTEN client in the same run.
#[derive(Parser, Debug)]
#[command(name = "pgfeed-bench", version)]
pub(crate) struct Args {
    /// Scenario whose settings are the defaults; the flags below override them.
    #[arg(long, value_enum, default_value = "smoke")]
    pub(crate) preset: Preset,
    /// Use this PostgreSQL (a superuser URL) instead of starting a throwaway cluster. The
    /// benchmark installs the schema there and creates tables named `pgfeed_bench*`.
    #[arg(long)]
    pub(crate) database_url: Option<String>,
    /// With --database-url: create a fresh database on that server and drop it afterwards.
    #[arg(long)]
    pub(crate) fresh_database: bool,
    /// SSE subscribers to open.
    #[arg(long)]
    pub(crate) subscribers: Option<usize>,
    /// Tenants the subscribers are spread over (subscriber i is tenant `t{i % tenants}`).
    #[arg(long)]
    pub(crate) tenants: Option<usize>,
    /// Tenants the written rows are spread over (row r is tenant `t{r % write_tenants}`).
    #[arg(long)]
    pub(crate) write_tenants: Option<usize>,
    /// Commits per second over all writers; 0 = as fast as the database takes them.
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// Rows per commit (one INSERT statement per commit).
    #[arg(long)]
    pub(crate) rows_per_commit: Option<usize>,
    /// Seconds of writing (the write phase ends at this or at --changes, first reached).
    #[arg(long)]
    pub(crate) duration: Option<f64>,
    /// Changes (rows) to write at most.
    #[arg(long)]
    pub(crate) changes: Option<u64>,
    /// Writer connections.
    #[arg(long)]
    pub(crate) writers: Option<usize>,
    /// Extra subscribers that stop reading once their stream is live (stalled clients):
    /// not counted in the deliveries; the gateway's memory must stay bounded.
    #[arg(long, default_value_t = 0)]
    pub(crate) stalled: usize,
    /// Seconds to hold the streams idle after all are live, before writing.
    #[arg(long)]
    pub(crate) hold: Option<f64>,
    /// Bytes of filler text in each row.
    #[arg(long)]
    pub(crate) payload_bytes: Option<usize>,
    /// Repetitions; figures are reported per run and as the median (default: 3 for
    /// presets a to e, 1 for smoke).
    #[arg(long)]
    pub(crate) runs: Option<usize>,
    /// How the gateway runs.
    #[arg(long, value_enum, default_value = "process")]
    pub(crate) gateway: GatewayMode,
    /// The `pgfeed` binary (default: next to this executable).
    #[arg(long)]
    pub(crate) pgfeed_bin: Option<PathBuf>,
    /// Extra gateway settings as KEY=VALUE environment variables (e.g.
    /// PGFEED_SERVER_LIVE_BUFFER=4096).
    #[arg(long = "gateway-env")]
    pub(crate) gateway_env: Vec<String>,
    /// Spread client sockets over this many source addresses 127.0.0.1..127.0.0.n (default:
    /// one per 2 000 streams; binding many sockets to one address makes the kernel's port
    /// search slow, and one address has only ~28 000 ephemeral ports).
    #[arg(long)]
    pub(crate) source_addrs: Option<usize>,
    /// Stream handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    pub(crate) connect_concurrency: usize,
    /// Seconds to wait for outstanding deliveries once the writers are done (without
    /// progress).
    #[arg(long, default_value_t = 15.0)]
    pub(crate) drain_timeout: f64,
    /// fsync and synchronous_commit of the throwaway cluster (on = durable, as in
    /// production).
    #[arg(long, value_enum, default_value = "on")]
    pub(crate) fsync: OnOff,
    /// Extra settings for the throwaway cluster, as KEY=VALUE lines of postgresql.conf
    /// (e.g. `jit=off`).
    #[arg(long = "pg-conf")]
    pub(crate) pg_conf: Vec<String>,
    /// Skip the raw LISTEN floor.
    #[arg(long)]
    pub(crate) no_floor: bool,
    /// Scenario e: seconds per pgbench run.
    #[arg(long)]
    pub(crate) pgbench_seconds: Option<u32>,
    /// Scenario e: client counts, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub(crate) pgbench_clients: Vec<u32>,
    /// Scenario e: the pgbench binary.
    #[arg(long)]
    pub(crate) pgbench_bin: Option<PathBuf>,
}

/// Settings of one invocation, after the preset and the flags.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct Params {
    pub(crate) preset: &'static str,
    pub(crate) subscribers: usize,
    pub(crate) tenants: usize,
    pub(crate) write_tenants: usize,
    /// Commits per second; 0 = unpaced.
    pub(crate) rate: f64,
    pub(crate) rows_per_commit: usize,
    pub(crate) duration_s: Option<f64>,
    pub(crate) changes: Option<u64>,
    pub(crate) writers: usize,
    pub(crate) hold_s: f64,
    pub(crate) stalled: usize,
    pub(crate) payload_bytes: usize,
    pub(crate) runs: usize,
    pub(crate) gateway: &'static str,
    pub(crate) source_addrs: usize,
    pub(crate) fsync: bool,
    pub(crate) pg_conf: Vec<String>,
    pub(crate) pgbench_seconds: u32,
    pub(crate) pgbench_clients: Vec<u32>,
}

impl Params {
    pub(crate) fn resolve(a: &Args) -> Result<Params> {
        // (subscribers, tenants, write_tenants, rate, rows, duration, changes, writers, hold, runs)
        type Row = (
            usize,
            usize,
            usize,
            f64,
            usize,
            Option<f64>,
            Option<u64>,
            usize,
            f64,
            usize,
        );
        let (name, d): (&'static str, Row) = match a.preset {
            Preset::Smoke => ("smoke", (6, 3, 3, 150.0, 1, None, Some(300), 2, 0.5, 1)),
            Preset::A => (
                "a",
                (1000, 100, 100, 1000.0, 1, Some(20.0), None, 8, 2.0, 3),
            ),
            Preset::B => (
                "b",
                (10_000, 1000, 1000, 0.0, 50, Some(20.0), None, 8, 2.0, 3),
            ),
            Preset::C => ("c", (100, 1, 1, 0.0, 50, Some(20.0), None, 8, 2.0, 3)),
            Preset::D => (
                "d",
                (50_000, 1000, 1000, 0.0, 1000, None, Some(1000), 1, 60.0, 3),
            ),
            Preset::E => ("e", (0, 0, 0, 0.0, 1, None, None, 0, 0.0, 3)),
        };
        let subscribers = a.subscribers.unwrap_or(d.0);
        let tenants = a.tenants.unwrap_or(d.1).max(1);
        let p = Params {
            preset: name,
            subscribers,
            tenants,
            write_tenants: a.write_tenants.unwrap_or(if a.tenants.is_some() {
                tenants
            } else {
                d.2
            }),
            rate: a.rate.unwrap_or(d.3),
            rows_per_commit: a.rows_per_commit.unwrap_or(d.4),
            duration_s: a.duration.or(if a.changes.is_some() { None } else { d.5 }),
            changes: a.changes.or(if a.duration.is_some() { None } else { d.6 }),
            writers: a.writers.unwrap_or(d.7),
            hold_s: a.hold.unwrap_or(d.8),
            stalled: a.stalled,
            payload_bytes: a.payload_bytes.unwrap_or(64),
            runs: a.runs.unwrap_or(d.9).max(1),
            gateway: match a.gateway {
                GatewayMode::Process => "process",
                GatewayMode::InProcess => "in-process",
            },
            source_addrs: a
                .source_addrs
                .unwrap_or(subscribers.div_ceil(2_000).clamp(1, 64))
                .clamp(1, 250),
            fsync: a.fsync == OnOff::On,
            pg_conf: a.pg_conf.clone(),
            pgbench_seconds: a.pgbench_seconds.unwrap_or(10),
            pgbench_clients: if a.pgbench_clients.is_empty() {
                vec![1, 8]
            } else {
                a.pgbench_clients.clone()
            },
        };
        if a.preset != Preset::E {
            if p.write_tenants == 0 || p.rows_per_commit == 0 {
                bail!("--write-tenants and --rows-per-commit must be at least 1");
            }
            if p.writers == 0 {
                bail!("--writers must be at least 1");
            }
            if p.duration_s.is_none() && p.changes.is_none() {
                bail!("give --duration or --changes (or both)");
            }
            if p.rate < 0.0 {
                bail!("--rate must be 0 (unpaced) or positive");
            }
        }
        Ok(p)
    }
}
