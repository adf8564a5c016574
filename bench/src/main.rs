//! `pgfeed-bench`: the project's own benchmark (see BENCHMARKS.md).
//!
//! One run starts a throwaway PostgreSQL (or uses `--database-url`), installs the schema,
//! creates and watches a benchmark table, starts the gateway (by default as a child
//! process, `pgfeed serve`, so that its RSS and CPU are its own), opens N SSE subscribers
//! over T tenants on raw TCP sockets with real tokens, commits changes at a given rate over
//! K writer connections, and reports per-delivery latency (from just before the write to
//! receipt, computed from a send timestamp stored in the row), deliveries per second,
//! expected versus received, missing, duplicated, cross-tenant leaks and the gateway's
//! memory. A plain tokio-postgres `LISTEN` client hears the same commits' doorbells in the
//! same run: that is the floor the gateway is compared with. After the gateway stops, the
//! CPU cost of one bare `write()` of a frame of the run's mean size to loopback TCP is the
//! floor its CPU per delivery is compared with. Scenario `e` measures the write path with
//! pgbench instead.
//!
//! Output: a human table on stdout, then one JSON line starting with `{"bench":`.
//! Exit status: 0, or 2 when anything was missing, duplicated, leaked or refused.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, ValueEnum};
use futures_util::future::poll_fn;
use memchr::memmem;
use pgfeed::cluster::{Cluster, Search};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

/// HS256 secret of the benchmark's gateway.
const SECRET: &str = "pgfeed-bench-secret-0123456789abcdef";
/// The watched table of the delivery scenarios.
const TABLE: &str = "pgfeed_bench";
/// `application_name` of the writer connections (the wait-event sampler looks for it).
const WRITER_APP: &str = "pgfeed-bench-writer";

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Preset {
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
enum GatewayMode {
    /// `pgfeed serve` as a child process: its RSS and CPU are its own.
    Process,
    /// `pgfeed::serve` on its own runtime inside this process (RSS includes the bench).
    InProcess,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

/// pgfeed's benchmark: latency, deliveries per second, memory per stream and write-path
/// cost against a real PostgreSQL, compared with a raw LISTEN client in the same run.
#[derive(Parser, Debug)]
#[command(name = "pgfeed-bench", version)]
struct Args {
    /// Scenario whose settings are the defaults; the flags below override them.
    #[arg(long, value_enum, default_value = "smoke")]
    preset: Preset,
    /// Use this PostgreSQL (a superuser URL) instead of starting a throwaway cluster. The
    /// benchmark installs the schema there and creates tables named `pgfeed_bench*`.
    #[arg(long)]
    database_url: Option<String>,
    /// With --database-url: create a fresh database on that server and drop it afterwards.
    #[arg(long)]
    fresh_database: bool,
    /// SSE subscribers to open.
    #[arg(long)]
    subscribers: Option<usize>,
    /// Tenants the subscribers are spread over (subscriber i is tenant `t{i % tenants}`).
    #[arg(long)]
    tenants: Option<usize>,
    /// Tenants the written rows are spread over (row r is tenant `t{r % write_tenants}`).
    #[arg(long)]
    write_tenants: Option<usize>,
    /// Commits per second over all writers; 0 = as fast as the database takes them.
    #[arg(long)]
    rate: Option<f64>,
    /// Rows per commit (one INSERT statement per commit).
    #[arg(long)]
    rows_per_commit: Option<usize>,
    /// Seconds of writing (the write phase ends at this or at --changes, first reached).
    #[arg(long)]
    duration: Option<f64>,
    /// Changes (rows) to write at most.
    #[arg(long)]
    changes: Option<u64>,
    /// Writer connections.
    #[arg(long)]
    writers: Option<usize>,
    /// Extra subscribers that stop reading once their stream is live (stalled clients):
    /// not counted in the deliveries; the gateway's memory must stay bounded.
    #[arg(long, default_value_t = 0)]
    stalled: usize,
    /// Seconds to hold the streams idle after all are live, before writing.
    #[arg(long)]
    hold: Option<f64>,
    /// Bytes of filler text in each row.
    #[arg(long)]
    payload_bytes: Option<usize>,
    /// Repetitions; figures are reported per run and as the median (default: 3 for
    /// presets a to e, 1 for smoke).
    #[arg(long)]
    runs: Option<usize>,
    /// How the gateway runs.
    #[arg(long, value_enum, default_value = "process")]
    gateway: GatewayMode,
    /// The `pgfeed` binary (default: next to this executable).
    #[arg(long)]
    pgfeed_bin: Option<PathBuf>,
    /// Extra gateway settings as KEY=VALUE environment variables (e.g.
    /// PGFEED_SERVER_LIVE_BUFFER=4096).
    #[arg(long = "gateway-env")]
    gateway_env: Vec<String>,
    /// Spread client sockets over this many source addresses 127.0.0.1..127.0.0.n (default:
    /// one per 2 000 streams; binding many sockets to one address makes the kernel's port
    /// search slow, and one address has only ~28 000 ephemeral ports).
    #[arg(long)]
    source_addrs: Option<usize>,
    /// Stream handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Seconds to wait for outstanding deliveries once the writers are done (without
    /// progress).
    #[arg(long, default_value_t = 15.0)]
    drain_timeout: f64,
    /// fsync and synchronous_commit of the throwaway cluster (on = durable, as in
    /// production).
    #[arg(long, value_enum, default_value = "on")]
    fsync: OnOff,
    /// Extra settings for the throwaway cluster, as KEY=VALUE lines of postgresql.conf
    /// (e.g. `jit=off`).
    #[arg(long = "pg-conf")]
    pg_conf: Vec<String>,
    /// Skip the raw LISTEN floor.
    #[arg(long)]
    no_floor: bool,
    /// Scenario e: seconds per pgbench run.
    #[arg(long)]
    pgbench_seconds: Option<u32>,
    /// Scenario e: client counts, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pgbench_clients: Vec<u32>,
    /// Scenario e: the pgbench binary.
    #[arg(long)]
    pgbench_bin: Option<PathBuf>,
}

/// Settings of one invocation, after the preset and the flags.
#[derive(Clone, Debug, serde::Serialize)]
struct Params {
    preset: &'static str,
    subscribers: usize,
    tenants: usize,
    write_tenants: usize,
    /// Commits per second; 0 = unpaced.
    rate: f64,
    rows_per_commit: usize,
    duration_s: Option<f64>,
    changes: Option<u64>,
    writers: usize,
    hold_s: f64,
    stalled: usize,
    payload_bytes: usize,
    runs: usize,
    gateway: &'static str,
    source_addrs: usize,
    fsync: bool,
    pg_conf: Vec<String>,
    pgbench_seconds: u32,
    pgbench_clients: Vec<u32>,
}

impl Params {
    fn resolve(a: &Args) -> Result<Params> {
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

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

/// Wall-clock microseconds since the epoch: writers and readers share this clock.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u32], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(f64::from(sorted[rank.clamp(1, sorted.len()) - 1]))
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// Raises the open-file limit to `want` (root may raise the hard limit too).
fn raise_nofile(want: u64) -> u64 {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    if soft >= want {
        return soft;
    }
    if rlimit::setrlimit(rlimit::Resource::NOFILE, want, want.max(hard)).is_ok() {
        return want;
    }
    rlimit::increase_nofile_limit(want).unwrap_or(soft)
}

// ---------------------------------------------------------------------------------------
// /proc probes
// ---------------------------------------------------------------------------------------

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// (utime + stime in clock ticks, parent pid) of a process.
fn proc_stat(pid: u32) -> Option<(u64, u32)> {
    let (user, sys, ppid, _) = proc_times(pid)?;
    Some((user + sys, ppid))
}

/// (utime, stime, parent pid, cutime + cstime of reaped children; times in clock ticks)
/// of a process.
fn proc_times(pid: u32) -> Option<(u64, u64, u32, u64)> {
    stat_times(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// [`proc_times`]' fields out of the text of a `stat` file (a process's or a thread's).
fn stat_times(text: &str) -> Option<(u64, u64, u32, u64)> {
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((tick(11)?, tick(12)?, ppid, tick(13)? + tick(14)?))
}

/// CPU seconds used so far by the calling thread: the scheduler's nanosecond count
/// (`/proc/thread-self/schedstat`), else utime + stime in clock ticks
/// (`/proc/thread-self/stat`). The crate forbids `unsafe`, so no `clock_gettime`.
fn thread_cpu_s() -> Option<f64> {
    if let Ok(text) = std::fs::read_to_string("/proc/thread-self/schedstat")
        && let Some(ns) = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
    {
        return Some(ns as f64 / 1e9);
    }
    let (user, sys, _, _) = stat_times(&std::fs::read_to_string("/proc/thread-self/stat").ok()?)?;
    Some((user + sys) as f64 / *CLK_TCK)
}

/// Kernel CPU seconds used so far by `pid`.
fn sys_cpu_s(pid: u32) -> f64 {
    proc_times(pid).map_or(0.0, |(_, s, _, _)| s as f64 / *CLK_TCK)
}

/// Busy CPU seconds of the whole machine so far (all cores; /proc/stat).
fn machine_busy_s() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|i| f.get(*i)).sum();
    busy as f64 / *CLK_TCK
}

static CLK_TCK: LazyLock<f64> = LazyLock::new(|| {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
});

/// CPU seconds used so far by `pid`.
fn cpu_s(pid: u32) -> f64 {
    proc_stat(pid).map_or(0.0, |(t, _)| t as f64 / *CLK_TCK)
}

/// CPU seconds used so far by `pid` and its children (a postmaster and its backends): the
/// live ones, and those that exited and were reaped (the parent's `cutime` + `cstime`).
/// Without the reaped ones, the writers' backends, which exit when the write phase ends,
/// were left out of PostgreSQL's figure.
fn tree_cpu_s(pid: u32) -> f64 {
    let mut ticks = proc_times(pid).map_or(0, |t| t.0 + t.1 + t.3);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if let Some(child) = entry.file_name().to_str().and_then(|s| s.parse().ok())
                && let Some((t, ppid)) = proc_stat(child)
                && ppid == pid
            {
                ticks += t;
            }
        }
    }
    ticks as f64 / *CLK_TCK
}

// ---------------------------------------------------------------------------------------
// The write floor: the bare kernel cost of one unbatched delivery
// ---------------------------------------------------------------------------------------

/// Writes timed at least, after the warm-up: the floor is a mean over many thousands.
const FLOOR_WRITES: u64 = 20_000;
/// Time spent writing at least, so that the tick-grained fallback of [`thread_cpu_s`]
/// still resolves the total to a few percent.
const FLOOR_MIN_TIME: Duration = Duration::from_millis(300);
/// Writes between two looks at the clock, and of the warm-up.
const FLOOR_BATCH: u64 = 1_000;

/// CPU time, in µs, of one `write()` of a `frame_bytes`-byte frame to a connected loopback
/// TCP socket: the least a delivery written on its own costs, whatever the gateway does
/// around it. Like the gateway's sockets, the writer has `TCP_NODELAY` (each write sends
/// its segment, as a lone frame does); a thread drains the other end so the writer never
/// waits for room. Only the writing thread's CPU counts; on loopback the kernel mostly
/// runs the receiving side's TCP input in the writer's context too, as it does for the
/// gateway's writes to the benchmark's streams.
fn write_floor_us(frame_bytes: usize) -> Result<f64> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let mut writer = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (reader, _) = listener.accept()?;
    writer.set_nodelay(true)?;
    let drainer = std::thread::spawn(move || drain(reader));
    let frame = vec![b'x'; frame_bytes.max(1)];
    for _ in 0..FLOOR_BATCH {
        writer.write_all(&frame)?;
    }
    let cpu0 = thread_cpu_s().context("reading /proc/thread-self")?;
    let start = Instant::now();
    let mut writes = 0u64;
    while writes < FLOOR_WRITES || start.elapsed() < FLOOR_MIN_TIME {
        for _ in 0..FLOOR_BATCH {
            writer.write_all(&frame)?;
        }
        writes += FLOOR_BATCH;
    }
    let cpu = thread_cpu_s().context("reading /proc/thread-self")? - cpu0;
    drop(writer);
    drainer
        .join()
        .map_err(|_| anyhow!("the write floor's reader panicked"))?;
    Ok(cpu * 1e6 / writes as f64)
}

/// Reads `stream` until the other end closes it.
fn drain(mut stream: std::net::TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

/// Measures the write floor for a frame of `frame_bytes` (the run's mean change frame) on
/// a blocking thread and sets it, with the gateway's CPU per delivery over it. Called
/// once the gateway has stopped: the floor neither competes with the gateway's work nor
/// counts in the write phase's CPU figures.
async fn set_write_floor(out: &mut RunResult, frame_bytes: usize) {
    let floor = tokio::task::spawn_blocking(move || write_floor_us(frame_bytes))
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
    match floor {
        Ok(us) if us > 0.0 => {
            out.set("write_floor_us", us);
            if let Some(gw) = out.figures.get("gw_cpu_us_per_delivery").copied() {
                out.set("gw_cpu_per_delivery_vs_write", gw / us);
            }
        }
        Ok(_) => {
            out.first_error
                .get_or_insert("write floor: no CPU time was counted".into());
        }
        Err(e) => {
            out.first_error.get_or_insert(format!("write floor: {e:#}"));
        }
    }
}

// ---------------------------------------------------------------------------------------
// A throwaway PostgreSQL: the library's (src/cluster.rs), with the benchmark's settings
// ---------------------------------------------------------------------------------------

/// Starts the library's throwaway cluster with the benchmark's settings: durable unless
/// `fsync` is false (later lines of postgresql.auto.conf override the cluster's own
/// non-durable defaults), room for many connections, and the `--pg-conf` lines.
fn start_cluster(fsync: bool, extra: &[String]) -> Result<Cluster> {
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

fn cluster_url(cluster: &Cluster, db: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{}/{db}", cluster.port())
}

/// Where the benchmark's database is.
struct Database {
    url: String,
    cluster: Option<Cluster>,
    /// A database this run created on a given server, dropped at the end: (admin url, name).
    created: Option<(String, String)>,
}

/// `url` with its database name replaced (URL form only).
fn with_dbname(url: &str, db: &str) -> Result<String> {
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
fn pinned(url: &str) -> Result<pgfeed::db::DbConfig> {
    let mut config = pgfeed::db::DbConfig::parse(url).context("parsing the database URL")?;
    pgfeed::db::pin_search_path(&mut config.pg);
    Ok(config)
}

async fn connect(url: &str) -> Result<tokio_postgres::Client> {
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
    async fn open(args: &Args, fsync: bool) -> Result<Database> {
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

    async fn close(self) {
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

    fn postmaster_pid(&self) -> Option<u32> {
        self.cluster.as_ref().and_then(Cluster::postmaster_pid)
    }

    /// The directory holding the cluster, when the tool started it: on the database's
    /// disk. With `--database-url` the tool cannot know that disk.
    fn disk_dir(&self) -> Option<PathBuf> {
        self.cluster.as_ref().map(|c| c.dir().to_path_buf())
    }
}

// ---------------------------------------------------------------------------------------
// The disk's flush latency during a write phase
// ---------------------------------------------------------------------------------------

/// Durable notifying commits are serialized through the WAL flush, so the disk's flush
/// latency bounds the commit rate, and it drifts on a virtual machine (0.07 to 0.5 ms
/// idle within one hour here). While the writers run, this overwrites 32 KiB and calls
/// fdatasync every 50 ms (about 640 KiB/s) in a file beside the cluster, so every report
/// shows what the disk did in that run.
struct DiskProbe {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<u32>>>,
}

impl DiskProbe {
    const BLOCK: usize = 32 * 1024;
    const BLOCKS: u64 = 128;

    /// Writes the file whole first (so that the timed writes allocate nothing), before
    /// the caller starts its clock.
    fn start(dir: &Path) -> Option<DiskProbe> {
        use std::os::unix::fs::FileExt;
        let path = dir.join(format!("pgfeed-bench-disk-probe-{}", std::process::id()));
        let file = std::fs::File::create(&path).ok()?;
        let buf = vec![b'x'; Self::BLOCK];
        let filled = (0..Self::BLOCKS)
            .try_for_each(|i| file.write_all_at(&buf, i * Self::BLOCK as u64))
            .and_then(|()| file.sync_all());
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let cleanup = path.clone();
        let thread = filled.ok().and_then(|()| {
            std::thread::Builder::new()
                .name("disk-probe".into())
                .spawn(move || {
                    let mut lat_us = Vec::new();
                    let mut i = 0u64;
                    while !stopped.load(Ordering::Relaxed) {
                        let t0 = Instant::now();
                        let offset = (i % Self::BLOCKS) * Self::BLOCK as u64;
                        if file.write_all_at(&buf, offset).is_err() || file.sync_data().is_err() {
                            break;
                        }
                        lat_us.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
                        i += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    drop(file);
                    let _ = std::fs::remove_file(&path);
                    lat_us
                })
                .ok()
        });
        if thread.is_none() {
            let _ = std::fs::remove_file(&cleanup);
            return None;
        }
        Some(DiskProbe { stop, thread })
    }

    /// Sorted latencies in µs.
    fn finish(mut self) -> Vec<u32> {
        self.stop.store(true, Ordering::Relaxed);
        let mut lat = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        lat.sort_unstable();
        lat
    }
}

impl Drop for DiskProbe {
    /// A run that fails half-way stops the probe too (and its file is removed).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Installs the schema and (re)creates the watched benchmark table. With `floor`, the
/// table also rings a raw NOTIFY at every insert statement, carrying the statement's send
/// time, for the raw LISTEN client ([`Floor`]): what a design with a NOTIFY from every
/// commit would deliver at best. pgfeed itself sends no NOTIFY per commit (only to wake a
/// sleeping gateway), so the floor is measured this way since schema 5.
async fn setup_table(url: &str, floor: bool) -> Result<()> {
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

/// The channel of the raw NOTIFY the floor listens to.
const FLOOR_CHANNEL: &str = "pgfeed_bench_floor";

// ---------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------

enum GatewayKind {
    Process {
        child: Child,
        log: PathBuf,
        /// Stops the child if this tool dies without doing so (a signal).
        watchdog: Option<Child>,
    },
    InProcess {
        shutdown: CancellationToken,
        thread: Option<std::thread::JoinHandle<()>>,
    },
}

struct Gateway {
    addr: SocketAddr,
    /// Whose RSS and CPU are the gateway's (this process when in-process).
    pid: u32,
    kind: GatewayKind,
}

fn gateway_env(url: &str, extra: &[String]) -> Result<Vec<(String, String)>> {
    let mut env = vec![
        ("DATABASE_URL".to_string(), url.to_string()),
        ("PGFEED_AUTH_SECRET".to_string(), SECRET.to_string()),
        (
            "PGFEED_SERVER_MAX_SUBSCRIBERS".to_string(),
            "10000000".to_string(),
        ),
        (
            "PGFEED_SERVER_MAX_SUBSCRIBERS_PER_TENANT".to_string(),
            "10000000".to_string(),
        ),
        (
            "PGFEED_SERVER_MAX_STREAM_RATE".to_string(),
            "1000000".to_string(),
        ),
    ];
    for kv in extra {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--gateway-env {kv:?} is not KEY=VALUE"))?;
        env.retain(|(name, _)| name != k);
        env.push((k.to_string(), v.to_string()));
    }
    Ok(env)
}

fn pgfeed_binary(args: &Args) -> Result<PathBuf> {
    if let Some(bin) = &args.pgfeed_bin {
        return Ok(bin.clone());
    }
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("pgfeed");
    if bin.exists() {
        Ok(bin)
    } else {
        bail!(
            "the pgfeed binary was not found at {}: build both binaries (`cargo build --release \
             --bins`), pass --pgfeed-bin, or use --gateway in-process",
            bin.display()
        )
    }
}

impl Gateway {
    async fn start(args: &Args, url: &str, scratch: &Path) -> Result<Gateway> {
        let env = gateway_env(url, &args.gateway_env)?;
        let gateway = match args.gateway {
            GatewayMode::Process => {
                let bin = pgfeed_binary(args)?;
                let port = free_port()?;
                let log = scratch.join(format!("gateway-{port}.log"));
                let mut cmd = Command::new(&bin);
                cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")]);
                for (name, _) in std::env::vars() {
                    if name.starts_with("PGFEED_") || name == "DATABASE_URL" {
                        cmd.env_remove(name);
                    }
                }
                let child = cmd
                    .envs(env)
                    .env("PGFEED_LOG", "warn")
                    .env("NO_COLOR", "1")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log)?)
                    .spawn()
                    .with_context(|| format!("starting {}", bin.display()))?;
                let watchdog = gateway_watchdog(child.id());
                Gateway {
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    pid: child.id(),
                    kind: GatewayKind::Process {
                        child,
                        log,
                        watchdog,
                    },
                }
            }
            GatewayMode::InProcess => {
                let config = pgfeed::config::Config::load(&pgfeed::config::Sources {
                    file: None,
                    env,
                    flags: vec![("server.listen", "127.0.0.1:0".to_string())],
                })?;
                let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
                std_listener.set_nonblocking(true)?;
                let addr = std_listener.local_addr()?;
                let shutdown = CancellationToken::new();
                let stop = shutdown.clone();
                // Its own runtime and threads (`server.threads`, as `pgfeed serve`), so the
                // load generator does not share them.
                let threads = config.server.threads;
                let thread =
                    std::thread::Builder::new()
                        .name("gateway".into())
                        .spawn(move || {
                            let rt = tokio::runtime::Builder::new_multi_thread()
                                .worker_threads(threads)
                                .thread_name("gateway-worker")
                                .enable_all()
                                .build()
                                .expect("gateway runtime");
                            rt.block_on(async move {
                                let listener = tokio::net::TcpListener::from_std(std_listener)
                                    .expect("gateway listener");
                                if let Err(e) = pgfeed::serve(config, listener, stop).await {
                                    eprintln!("gateway: {e}");
                                }
                            });
                        })?;
                Gateway {
                    addr,
                    pid: std::process::id(),
                    kind: GatewayKind::InProcess {
                        shutdown,
                        thread: Some(thread),
                    },
                }
            }
        };
        let mut gateway = gateway;
        gateway.wait_ready().await?;
        Ok(gateway)
    }

    fn log_tail(&self) -> String {
        match &self.kind {
            GatewayKind::Process { log, .. } => std::fs::read_to_string(log)
                .map(|s| {
                    let lines: Vec<&str> = s.lines().collect();
                    lines[lines.len().saturating_sub(20)..].join("\n")
                })
                .unwrap_or_default(),
            GatewayKind::InProcess { .. } => String::new(),
        }
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http_get(self.addr, "/readyz").await {
                return Ok(());
            }
            if let GatewayKind::Process { child, .. } = &mut self.kind
                && !matches!(child.try_wait(), Ok(None))
            {
                bail!("the gateway exited during start-up:\n{}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!(
                    "the gateway was not ready within 60 s:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid, "VmRSS").unwrap_or(0)
    }

    fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid, "VmHWM").unwrap_or(0)
    }

    /// Counts of warnings and errors the gateway logged (process mode).
    fn log_problems(&self) -> (usize, Option<String>) {
        match &self.kind {
            GatewayKind::Process { log, .. } => {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let bad: Vec<&str> = text
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .collect();
                (bad.len(), bad.first().map(|s| s.to_string()))
            }
            GatewayKind::InProcess { .. } => (0, None),
        }
    }

    async fn stop(mut self) {
        match &mut self.kind {
            GatewayKind::Process { child, .. } => {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    if matches!(child.try_wait(), Ok(Some(_))) {
                        break;
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            GatewayKind::InProcess { shutdown, thread } => {
                shutdown.cancel();
                if let Some(t) = thread.take() {
                    let _ = tokio::task::spawn_blocking(move || t.join()).await;
                }
            }
        }
    }
}

/// Sums of the gateway's Prometheus counters by metric name (labels summed over), or an
/// empty map when /metrics does not answer.
async fn scrape_metrics(addr: SocketAddr) -> HashMap<String, f64> {
    let mut sums = HashMap::new();
    if let Ok((200, body)) = http_get(addr, "/metrics").await {
        for line in body.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            if let Some(v) = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.trim().parse::<f64>().ok())
            {
                *sums.entry(name.to_string()).or_insert(0.0) += v;
            }
        }
    }
    sums
}

/// A detached shell (like the cluster's watchdog) that sends the gateway
/// SIGTERM if this process exits first, e.g. killed by a signal, which runs no
/// destructor. It ends by itself when the gateway is gone, and [`Gateway`]'s drop kills
/// it, so it never outlives the run it watches.
fn gateway_watchdog(gateway: u32) -> Option<Child> {
    let script = format!(
        "while kill -0 {me} 2>/dev/null && kill -0 {gateway} 2>/dev/null; do sleep 1; done; \
         kill -0 {me} 2>/dev/null || kill -TERM {gateway} 2>/dev/null",
        me = std::process::id(),
    );
    pgfeed::cluster::detached_shell(&script)
}

impl Drop for Gateway {
    /// An error path that never reached [`Gateway::stop`] must not leave the child running.
    fn drop(&mut self) {
        match &mut self.kind {
            GatewayKind::Process {
                child, watchdog, ..
            } => {
                if matches!(child.try_wait(), Ok(None)) {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                if let Some(mut watchdog) = watchdog.take() {
                    let _ = watchdog.kill();
                    let _ = watchdog.wait();
                }
            }
            GatewayKind::InProcess { shutdown, .. } => shutdown.cancel(),
        }
    }
}

/// A GET with `Connection: close`: (status, body including any chunk framing).
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connect timed out"))??;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .map_err(|_| anyhow!("response timed out"))??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((status, body))
}

// ---------------------------------------------------------------------------------------
// Subscribers: a lean SSE reader on raw sockets
// ---------------------------------------------------------------------------------------

/// What every subscriber task shares.
struct SubShared {
    /// Streams that received `event: live`.
    live: AtomicUsize,
    /// Streams that could not be opened.
    failed: AtomicUsize,
    /// Change events received, in all.
    delivered: AtomicU64,
    /// Receipt time of the newest change event (µs since the epoch).
    last_recv_us: AtomicU64,
    /// First sequence number of this run's rows.
    base: i64,
    /// Rows are spread over this many tenants.
    write_tenants: u64,
    /// First refusal or error, for the report.
    first_error: Mutex<Option<String>>,
}

#[derive(Default)]
struct SubResult {
    tenant: u32,
    live: bool,
    failed: bool,
    /// The server ended the stream before the benchmark stopped it.
    ended: bool,
    /// Sequence numbers received (relative to the run's base).
    seqs: Vec<u32>,
    /// Latency of each, in µs.
    lat_us: Vec<u32>,
    /// Events whose tenant is not the subscriber's.
    leaks: u64,
    /// Events whose position is not after the previous one.
    out_of_order: u64,
    /// Change events that could not be parsed.
    malformed: u64,
    /// Control events other than `live` (shutdown, expired, reset).
    other_control: u64,
    /// Change events received, well-formed or not: with `change_bytes`, the mean size of
    /// a change frame, which sizes the write floor's frame.
    change_frames: u64,
    /// Bytes of those change events as SSE text (`id:`, `event:`, `data:` lines and the
    /// blank line; chunked encoding removed).
    change_bytes: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading the hex size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(usize),
    /// The CRLF after a chunk's data, this many bytes left.
    Crlf(usize),
    /// The last chunk was read.
    Done,
}

/// Incremental HTTP/1.1 response + chunked + SSE parser.
struct Reader {
    head_done: bool,
    status: u16,
    chunked: bool,
    chunk: Chunk,
    /// Bytes not yet de-chunked.
    raw: Vec<u8>,
    /// De-chunked SSE text not yet consumed.
    text: Vec<u8>,
    tenant: Arc<str>,
    last_pos: (u64, u64),
}

static EVENT_END: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\n\n"));
static CRLF: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b"\r\n"));
static HEAD_END: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\r\n\r\n"));
static KEY_SEQ: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"seq\":"));
static KEY_SENT: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"sent_us\":"));
static KEY_TENANT: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"tenant\":"));

fn skip_ws(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
    &s[n..]
}

/// The integer after `key` in `data`.
fn json_int(data: &[u8], key: &memmem::Finder<'_>) -> Option<i64> {
    let at = key.find(data)? + key.needle().len();
    let s = skip_ws(&data[at..]);
    let (neg, s) = match s.first() {
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    let digits = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut v: i64 = 0;
    for &b in &s[..digits] {
        v = v.checked_mul(10)?.checked_add(i64::from(b - b'0'))?;
    }
    Some(if neg { -v } else { v })
}

/// Whether every `"tenant":` string in `data` equals `tenant` (and there is at least one).
fn tenants_match(data: &[u8], tenant: &[u8]) -> bool {
    let mut seen = false;
    for at in KEY_TENANT.find_iter(data) {
        let s = skip_ws(&data[at + KEY_TENANT.needle().len()..]);
        let Some(s) = s.strip_prefix(b"\"") else {
            return false;
        };
        let Some(end) = memchr::memchr(b'"', s) else {
            return false;
        };
        if &s[..end] != tenant {
            return false;
        }
        seen = true;
    }
    seen
}

fn parse_position(id: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(id).ok()?;
    let (c, o) = s.trim().split_once('.')?;
    Some((c.parse().ok()?, o.parse().ok()?))
}

impl Reader {
    fn new(tenant: Arc<str>) -> Reader {
        Reader {
            head_done: false,
            status: 0,
            chunked: false,
            chunk: Chunk::Size,
            raw: Vec::new(),
            text: Vec::new(),
            tenant,
            last_pos: (0, 0),
        }
    }

    /// Feeds received bytes; returns the number of change events in them.
    fn feed(&mut self, bytes: &[u8], now: u64, res: &mut SubResult, shared: &SubShared) -> u64 {
        self.raw.extend_from_slice(bytes);
        if !self.head_done {
            let Some(end) = HEAD_END.find(&self.raw) else {
                return 0;
            };
            let head = String::from_utf8_lossy(&self.raw[..end]).to_ascii_lowercase();
            self.status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            self.chunked = head.contains("transfer-encoding: chunked");
            self.head_done = true;
            self.raw.drain(..end + 4);
            if self.status != 200 {
                return 0;
            }
        }
        self.dechunk();
        self.events(now, res, shared)
    }

    fn dechunk(&mut self) {
        if !self.chunked {
            self.text.extend_from_slice(&self.raw);
            self.raw.clear();
            return;
        }
        let mut pos = 0;
        loop {
            match self.chunk {
                Chunk::Done => {
                    pos = self.raw.len();
                    break;
                }
                Chunk::Size => {
                    let Some(nl) = CRLF.find(&self.raw[pos..]) else {
                        break;
                    };
                    let line = &self.raw[pos..pos + nl];
                    let hex = line.split(|b| *b == b';').next().unwrap_or(b"");
                    let size = std::str::from_utf8(hex)
                        .ok()
                        .and_then(|h| usize::from_str_radix(h.trim(), 16).ok())
                        .unwrap_or(0);
                    pos += nl + 2;
                    self.chunk = if size == 0 {
                        Chunk::Done
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    let avail = self.raw.len() - pos;
                    if avail == 0 {
                        break;
                    }
                    let take = left.min(avail);
                    self.text.extend_from_slice(&self.raw[pos..pos + take]);
                    pos += take;
                    self.chunk = if take == left {
                        Chunk::Crlf(2)
                    } else {
                        Chunk::Data(left - take)
                    };
                }
                Chunk::Crlf(left) => {
                    let avail = self.raw.len() - pos;
                    if avail == 0 {
                        break;
                    }
                    let take = left.min(avail);
                    pos += take;
                    self.chunk = if take == left {
                        Chunk::Size
                    } else {
                        Chunk::Crlf(left - take)
                    };
                }
            }
        }
        self.raw.drain(..pos);
    }

    fn events(&mut self, now: u64, res: &mut SubResult, shared: &SubShared) -> u64 {
        let mut pos = 0;
        let mut changes = 0;
        let text = std::mem::take(&mut self.text);
        while let Some(end) = EVENT_END.find(&text[pos..]) {
            let block = &text[pos..pos + end];
            pos += end + 2;
            let mut id: Option<&[u8]> = None;
            let mut event: &[u8] = b"message";
            let mut data: Option<&[u8]> = None;
            for line in block.split(|b| *b == b'\n') {
                if let Some(v) = line.strip_prefix(b"data: ") {
                    data = Some(v);
                } else if let Some(v) = line.strip_prefix(b"event: ") {
                    event = v;
                } else if let Some(v) = line.strip_prefix(b"id: ") {
                    id = Some(v);
                }
            }
            match event {
                b"change" => {
                    changes += 1;
                    res.change_frames += 1;
                    res.change_bytes += (end + 2) as u64;
                    self.change(id, data, now, res, shared);
                }
                b"live" => res.live = true,
                b"message" => {}
                _ => res.other_control += 1,
            }
        }
        self.text = text;
        self.text.drain(..pos);
        changes
    }

    fn change(
        &mut self,
        id: Option<&[u8]>,
        data: Option<&[u8]>,
        now: u64,
        res: &mut SubResult,
        shared: &SubShared,
    ) {
        let Some(data) = data else {
            res.malformed += 1;
            return;
        };
        if let Some(pos) = id.and_then(parse_position) {
            if pos <= self.last_pos {
                res.out_of_order += 1;
            }
            self.last_pos = pos;
        }
        let (Some(seq), Some(sent)) = (json_int(data, &KEY_SEQ), json_int(data, &KEY_SENT)) else {
            res.malformed += 1;
            return;
        };
        let rel = seq - shared.base;
        let own_rows = rel >= 0 && (rel as u64) % shared.write_tenants == u64::from(res.tenant);
        if !own_rows || !tenants_match(data, self.tenant.as_bytes()) {
            res.leaks += 1;
            return;
        }
        res.seqs.push(u32::try_from(rel).unwrap_or(u32::MAX));
        let lat = now.saturating_sub(u64::try_from(sent).unwrap_or(0));
        res.lat_us.push(u32::try_from(lat).unwrap_or(u32::MAX));
    }
}

thread_local! {
    /// Read buffer shared by the subscriber tasks of a worker thread: a stream holds no
    /// buffer of its own while idle.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 64 * 1024]);
}

struct SubSpec {
    addr: SocketAddr,
    source: Ipv4Addr,
    tenant: u32,
    tenant_name: Arc<str>,
    token: Arc<str>,
    /// Stop reading once live.
    stall: bool,
}

async fn subscriber(
    spec: SubSpec,
    shared: Arc<SubShared>,
    gate: Arc<Semaphore>,
    stop: CancellationToken,
) -> SubResult {
    let mut res = SubResult {
        tenant: spec.tenant,
        ..SubResult::default()
    };
    let fail = |res: &mut SubResult, why: String| {
        res.failed = true;
        shared.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = shared.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(why);
    };
    let mut permit: Option<OwnedSemaphorePermit> = match gate.acquire_owned().await {
        Ok(p) => Some(p),
        Err(_) => return res,
    };
    let connect = async {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(spec.source.into(), 0))?;
        let stream = socket.connect(spec.addr).await?;
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(stream)
    };
    let mut stream = match tokio::time::timeout(Duration::from_secs(60), connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            fail(&mut res, format!("connect: {e}"));
            return res;
        }
        Err(_) => {
            fail(&mut res, "connect timed out".into());
            return res;
        }
    };
    let request = format!(
        "GET /v1/stream HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nAuthorization: Bearer {}\r\n\r\n",
        spec.addr, spec.token
    );
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        fail(&mut res, format!("sending the request: {e}"));
        return res;
    }
    let mut reader = Reader::new(spec.tenant_name);
    // One cancellation future for the stream's life: a new one per read registered and
    // removed a waiter on the token all streams share, under its lock.
    let mut stopped = std::pin::pin!(stop.cancelled());
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            ready = stream.readable() => if let Err(e) = ready {
                fail(&mut res, format!("reading: {e}"));
                break;
            }
        }
        let read = SCRATCH.with(|scratch| {
            let mut buf = scratch.borrow_mut();
            match stream.try_read(&mut buf) {
                Ok(0) => Ok(None),
                Ok(n) => {
                    let now = now_us();
                    let changes = reader.feed(&buf[..n], now, &mut res, &shared);
                    Ok(Some((changes, now)))
                }
                Err(e) => Err(e),
            }
        });
        match read {
            Ok(Some((changes, now))) => {
                if changes > 0 {
                    shared.delivered.fetch_add(changes, Ordering::Relaxed);
                    shared.last_recv_us.fetch_max(now, Ordering::Relaxed);
                }
                if reader.head_done && reader.status != 200 {
                    let body = String::from_utf8_lossy(&reader.raw).into_owned();
                    fail(&mut res, format!("HTTP {}: {body}", reader.status));
                    break;
                }
                if res.live && permit.is_some() {
                    permit = None;
                    shared.live.fetch_add(1, Ordering::Relaxed);
                    if spec.stall {
                        // A client that stops reading: hold the socket, read nothing.
                        stopped.as_mut().await;
                        break;
                    }
                }
            }
            Ok(None) => {
                res.ended = true;
                if !res.live {
                    fail(&mut res, "the stream closed before `live`".into());
                }
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                fail(&mut res, format!("reading: {e}"));
                break;
            }
        }
    }
    drop(permit);
    res
}

// ---------------------------------------------------------------------------------------
// Writers
// ---------------------------------------------------------------------------------------

struct WriteShared {
    next_slot: AtomicU64,
    max_slots: u64,
    start: Instant,
    rate: f64,
    deadline: Option<Instant>,
    rows: i64,
    base: i64,
    write_tenants: i64,
    pad: String,
}

#[derive(Default)]
struct WriterResult {
    committed: Vec<u64>,
    failed: u64,
    first_error: Option<String>,
    commit_us: Vec<u32>,
    first_sent_us: Option<u64>,
}

async fn writer(client: tokio_postgres::Client, shared: Arc<WriteShared>) -> WriterResult {
    let mut res = WriterResult::default();
    let sql = if shared.rows == 1 {
        format!("INSERT INTO public.{TABLE} (seq, tenant, sent_us, pad) VALUES ($1, $2, $3, $4)")
    } else {
        format!(
            "INSERT INTO public.{TABLE} (seq, tenant, sent_us, pad)
             SELECT s, 't' || ((s - $2::bigint) % $5::bigint), $3::bigint, $4::text
             FROM generate_series($1::bigint, $1::bigint + $6::bigint - 1) AS s"
        )
    };
    let stmt = match client.prepare(&sql).await {
        Ok(s) => s,
        Err(e) => {
            res.first_error = Some(format!("prepare: {e}"));
            return res;
        }
    };
    loop {
        let slot = shared.next_slot.fetch_add(1, Ordering::Relaxed);
        if slot >= shared.max_slots {
            break;
        }
        if shared.rate > 0.0 {
            let due = shared.start + Duration::from_secs_f64(slot as f64 / shared.rate);
            tokio::time::sleep_until(due.into()).await;
        }
        if shared.deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let first = shared.base + slot as i64 * shared.rows;
        let rel = first - shared.base;
        let sent = now_us();
        res.first_sent_us.get_or_insert(sent);
        let sent_i = sent as i64;
        let t0 = Instant::now();
        let outcome = if shared.rows == 1 {
            let tenant = format!("t{}", rel % shared.write_tenants);
            client
                .execute(&stmt, &[&first, &tenant, &sent_i, &shared.pad])
                .await
        } else {
            client
                .execute(
                    &stmt,
                    &[
                        &first,
                        &shared.base,
                        &sent_i,
                        &shared.pad,
                        &shared.write_tenants,
                        &shared.rows,
                    ],
                )
                .await
        };
        res.commit_us
            .push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
        match outcome {
            Ok(_) => res.committed.push(slot),
            Err(e) => {
                res.failed += 1;
                res.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    res
}

// ---------------------------------------------------------------------------------------
// The floor: a plain LISTEN client on the same doorbells
// ---------------------------------------------------------------------------------------

struct Floor {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: std::thread::JoinHandle<Result<Vec<(i64, u64)>>>,
}

impl Floor {
    /// Connects and LISTENs on its own thread and runtime, so the load generator's
    /// work does not delay its receipt timestamps.
    fn start(url: &str) -> Result<Floor> {
        let url = url.to_string();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("floor".into()).spawn(
            move || -> Result<Vec<(i64, u64)>> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let connecting =
                        async { pinned(&url)?.connect().await.map_err(anyhow::Error::from) };
                    let (client, mut conn) = match connecting.await {
                        Ok(pair) => pair,
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow!("floor connect: {e}")));
                            bail!("floor connect: {e}");
                        }
                    };
                    let pump = tokio::spawn(async move {
                        let mut heard = Vec::new();
                        while let Some(Ok(msg)) = poll_fn(|cx| conn.poll_message(cx)).await {
                            if let AsyncMessage::Notification(n) = msg {
                                let at = now_us();
                                if let Ok(sent) = n.payload().parse::<i64>() {
                                    heard.push((sent, at));
                                }
                            }
                        }
                        heard
                    });
                    let listen = format!("LISTEN {FLOOR_CHANNEL}");
                    if let Err(e) = client.batch_execute(&listen).await {
                        let _ = ready_tx.send(Err(anyhow!("floor LISTEN: {e}")));
                        bail!("floor LISTEN: {e}");
                    }
                    let _ = ready_tx.send(Ok(()));
                    let _ = stop_rx.await;
                    drop(client);
                    Ok(pump.await?)
                })
            },
        )?;
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow!("the floor listener did not start"))??;
        Ok(Floor {
            stop: Some(stop_tx),
            thread,
        })
    }

    fn finish(mut self) -> Result<Vec<(i64, u64)>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.thread
            .join()
            .map_err(|_| anyhow!("floor thread panicked"))?
    }
}

/// Latencies (µs) of the floor's notifications: receipt minus the send time they carry
/// (the first row of the statement that rang).
fn floor_latencies(heard: &[(i64, u64)], since_us: u64) -> Vec<u32> {
    heard
        .iter()
        .filter_map(|(sent, at)| {
            let s = u64::try_from(*sent).ok()?;
            (s >= since_us).then(|| u32::try_from(at.saturating_sub(s)).unwrap_or(u32::MAX))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Where the database waits: pg_stat_activity sampled during a write phase
// ---------------------------------------------------------------------------------------

struct WaitSampler {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<HashMap<String, u64>>,
}

impl WaitSampler {
    async fn start(url: &str) -> Result<WaitSampler> {
        let client = connect(url).await?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut counts: HashMap<String, u64> = HashMap::new();
            let sql = format!(
                "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU'), count(*)
                 FROM pg_stat_activity
                 WHERE datname = current_database() AND state = 'active'
                   AND application_name IN ('{WRITER_APP}', 'pgbench')
                 GROUP BY 1"
            );
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if let Ok(rows) = client.query(&sql, &[]).await {
                    for r in rows {
                        *counts.entry(r.get(0)).or_default() += r.get::<_, i64>(1) as u64;
                    }
                }
            }
            counts
        });
        Ok(WaitSampler { stop, task })
    }

    /// The top waits as "name pct%".
    async fn finish(self) -> Vec<(String, f64)> {
        self.stop.cancel();
        let counts = self.task.await.unwrap_or_default();
        let total: u64 = counts.values().sum();
        let mut v: Vec<(String, f64)> = counts
            .into_iter()
            .map(|(k, n)| (k, 100.0 * n as f64 / total.max(1) as f64))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v.truncate(4);
        v
    }
}

fn waits_text(waits: &[(String, f64)]) -> String {
    waits
        .iter()
        .map(|(k, p)| format!("{k} {p:.0}%"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------

/// How a figure is combined over runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Agg {
    Median,
    Sum,
}

/// (key, label, aggregation) of every figure a delivery run reports, in display order.
const FIGURES: &[(&str, &str, Agg)] = &[
    ("subscribers_live", "streams live", Agg::Median),
    ("stalled_live", "stalled streams (not reading)", Agg::Median),
    ("streams_failed", "streams refused/failed", Agg::Sum),
    ("connect_s", "time to open all streams (s)", Agg::Median),
    ("commits", "commits", Agg::Median),
    ("changes", "changes written", Agg::Median),
    ("write_errors", "write errors", Agg::Sum),
    ("write_s", "write phase (s)", Agg::Median),
    ("commits_per_s", "commits/s", Agg::Median),
    ("changes_per_s", "changes/s", Agg::Median),
    ("commit_p50_ms", "commit round trip p50 (ms)", Agg::Median),
    ("commit_p99_ms", "commit round trip p99 (ms)", Agg::Median),
    (
        "disk_flush_p50_ms",
        "disk: 32 KiB write + fdatasync p50 (ms)",
        Agg::Median,
    ),
    (
        "disk_flush_p90_ms",
        "disk: write + fdatasync p90 (ms)",
        Agg::Median,
    ),
    ("expected", "deliveries expected", Agg::Median),
    ("received", "deliveries received", Agg::Median),
    ("missing", "missing", Agg::Sum),
    ("duplicated", "duplicated", Agg::Sum),
    ("leaks", "cross-tenant leaks", Agg::Sum),
    ("phantom", "deliveries of uncommitted rows", Agg::Sum),
    ("out_of_order", "out of order", Agg::Sum),
    ("malformed", "malformed events", Agg::Sum),
    ("streams_ended", "streams ended by the server", Agg::Sum),
    ("deliveries_per_s", "deliveries/s", Agg::Median),
    ("p50_ms", "latency p50 (ms)", Agg::Median),
    ("p90_ms", "latency p90 (ms)", Agg::Median),
    ("p99_ms", "latency p99 (ms)", Agg::Median),
    ("p999_ms", "latency p99.9 (ms)", Agg::Median),
    ("max_ms", "latency max (ms)", Agg::Median),
    ("floor_notifications", "floor: notifications", Agg::Median),
    ("floor_p50_ms", "floor (raw LISTEN) p50 (ms)", Agg::Median),
    ("floor_p90_ms", "floor p90 (ms)", Agg::Median),
    ("floor_p99_ms", "floor p99 (ms)", Agg::Median),
    ("floor_p999_ms", "floor p99.9 (ms)", Agg::Median),
    ("floor_max_ms", "floor max (ms)", Agg::Median),
    (
        "p50_over_floor_ms",
        "gateway p50 - floor p50 (ms)",
        Agg::Median,
    ),
    (
        "gw_rss_start_kib",
        "gateway RSS at start (KiB)",
        Agg::Median,
    ),
    (
        "gw_rss_streams_kib",
        "gateway RSS, streams open (KiB)",
        Agg::Median,
    ),
    (
        "gw_kib_per_stream",
        "gateway RSS per stream (KiB)",
        Agg::Median,
    ),
    ("gw_rss_peak_kib", "gateway peak RSS (KiB)", Agg::Median),
    ("gw_cpu_s", "gateway CPU in write phase (s)", Agg::Median),
    ("gw_sys_pct", "of which in the kernel (%)", Agg::Median),
    (
        "gw_cpu_us_per_delivery",
        "gateway CPU per delivery (us)",
        Agg::Median,
    ),
    (
        "gw_cpu_us_per_change",
        "gateway CPU per change (us)",
        Agg::Median,
    ),
    (
        "change_frame_bytes",
        "change frame, mean size (bytes)",
        Agg::Median,
    ),
    (
        "write_floor_us",
        "bare write() of a frame, loopback (us)",
        Agg::Median,
    ),
    (
        "gw_cpu_per_delivery_vs_write",
        "gateway CPU per delivery / write()",
        Agg::Median,
    ),
    ("pg_cpu_s", "PostgreSQL CPU in write phase (s)", Agg::Median),
    (
        "bench_cpu_s",
        "load generator CPU in write phase (s)",
        Agg::Median,
    ),
    (
        "machine_busy_cores",
        "machine: busy cores in write phase",
        Agg::Median,
    ),
    (
        "other_cpu_cores",
        "machine: cores used by other processes",
        Agg::Median,
    ),
    ("gw_db_connections", "gateway DB connections", Agg::Median),
    ("gw_listen_connections", "of which LISTEN", Agg::Median),
    (
        "idle_queries_per_min",
        "gateway queries/min while idle",
        Agg::Median,
    ),
    (
        "gw_dispatch_mean_ms",
        "gateway: commit to publish, mean (ms)",
        Agg::Median,
    ),
    (
        "gw_lagged",
        "gateway: subscribers lagged (/metrics)",
        Agg::Median,
    ),
    (
        "gw_catchups",
        "gateway: journal catch-ups (/metrics)",
        Agg::Median,
    ),
    (
        "gw_journal_reads",
        "gateway: journal reads (/metrics)",
        Agg::Median,
    ),
    ("gw_log_warnings", "gateway warnings logged", Agg::Sum),
];

#[derive(Default)]
struct RunResult {
    figures: HashMap<&'static str, f64>,
    waits: Vec<(String, f64)>,
    first_error: Option<String>,
    /// Distinct texts of the queries the gateway ran during the idle hold.
    idle_queries: Vec<String>,
}

impl RunResult {
    fn set(&mut self, key: &'static str, value: f64) {
        assert!(FIGURES.iter().any(|(k, _, _)| *k == key), "{key}");
        self.figures.insert(key, value);
    }
}

fn fmt_value(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{v:.0}"),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 1.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.3}"),
    }
}

fn round3(v: f64) -> Value {
    json!((v * 1000.0).round() / 1000.0)
}

/// Prints the table and returns the JSON summary.
fn report_delivery(p: &Params, runs: &[RunResult], machine: &Value) -> (Value, bool) {
    let mut combined: Vec<(&str, &str, Option<f64>)> = Vec::new();
    for (key, label, agg) in FIGURES {
        let mut vals: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.figures.get(key).copied())
            .collect();
        let v = match agg {
            Agg::Sum if !vals.is_empty() => Some(vals.iter().sum()),
            Agg::Sum => None,
            Agg::Median => median(&mut vals),
        };
        combined.push((key, label, v));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\npgfeed-bench preset {}: {} subscribers over {} tenants; rows over {} tenants; {} rows/commit at {} over {} writers; gateway {}; fsync {}",
        p.preset,
        p.subscribers,
        p.tenants,
        p.write_tenants,
        p.rows_per_commit,
        if p.rate > 0.0 {
            format!("{} commits/s", p.rate)
        } else {
            "max rate".into()
        },
        p.writers,
        p.gateway,
        if p.fsync { "on" } else { "off" }
    );
    let _ = write!(out, "{:<40}", "figure");
    for i in 0..runs.len() {
        let _ = write!(out, "{:>14}", format!("run {}", i + 1));
    }
    let agg_head = if runs.len() > 1 { "median/total" } else { "" };
    let _ = writeln!(out, "{agg_head:>14}");
    for (key, label, v) in &combined {
        if v.is_none() {
            continue;
        }
        let _ = write!(out, "{label:<40}");
        for r in runs {
            let _ = write!(out, "{:>14}", fmt_value(r.figures.get(key).copied()));
        }
        if runs.len() > 1 {
            let _ = write!(out, "{:>14}", fmt_value(*v));
        }
        let _ = writeln!(out);
    }
    for (i, r) in runs.iter().enumerate() {
        if !r.waits.is_empty() {
            let _ = writeln!(
                out,
                "run {}: writers waited on: {}",
                i + 1,
                waits_text(&r.waits)
            );
        }
        if !r.idle_queries.is_empty() {
            let _ = writeln!(
                out,
                "run {}: gateway queries while idle: {}",
                i + 1,
                r.idle_queries.join(" | ")
            );
        }
        if let Some(e) = &r.first_error {
            let _ = writeln!(out, "run {}: first error: {e}", i + 1);
        }
    }
    let get = |k: &str| {
        combined
            .iter()
            .find(|(key, _, _)| *key == k)
            .and_then(|(_, _, v)| *v)
            .unwrap_or(0.0)
    };
    let ok = get("missing") == 0.0
        && get("duplicated") == 0.0
        && get("leaks") == 0.0
        && get("phantom") == 0.0
        && get("out_of_order") == 0.0
        && get("malformed") == 0.0
        && get("streams_failed") == 0.0;
    let _ = writeln!(
        out,
        "correctness: {}",
        if ok {
            "OK (nothing missing, duplicated, leaked or refused)"
        } else {
            "FAILED"
        }
    );
    print!("{out}");
    let summary: serde_json::Map<String, Value> = combined
        .iter()
        .filter_map(|(k, _, v)| v.map(|v| (k.to_string(), round3(v))))
        .collect();
    let per_run: Vec<Value> = runs
        .iter()
        .map(|r| {
            let mut m: serde_json::Map<String, Value> = FIGURES
                .iter()
                .filter_map(|(k, _, _)| r.figures.get(k).map(|v| (k.to_string(), round3(*v))))
                .collect();
            m.insert("idle_queries".into(), json!(r.idle_queries));
            m.insert(
                "db_waits".into(),
                json!(
                    r.waits
                        .iter()
                        .map(|(k, p)| json!({"wait": k, "pct": round3(*p)}))
                        .collect::<Vec<_>>()
                ),
            );
            Value::Object(m)
        })
        .collect();
    let totals = json!({
        "missing": get("missing"),
        "duplicated": get("duplicated"),
        "leaks": get("leaks"),
        "phantom": get("phantom"),
        "out_of_order": get("out_of_order"),
        "malformed": get("malformed"),
        "streams_failed": get("streams_failed"),
        "expected": runs.iter().filter_map(|r| r.figures.get("expected")).sum::<f64>(),
        "received": runs.iter().filter_map(|r| r.figures.get("received")).sum::<f64>(),
    });
    (
        json!({
            "bench": "pgfeed",
            "preset": p.preset,
            "params": p,
            "machine": machine,
            "ok": ok,
            "totals": totals,
            "summary": Value::Object(summary),
            "runs": per_run,
        }),
        ok,
    )
}

// ---------------------------------------------------------------------------------------
// A delivery run (scenarios a to d, smoke)
// ---------------------------------------------------------------------------------------

struct Env<'a> {
    args: &'a Args,
    params: &'a Params,
    db: &'a Database,
    scratch: PathBuf,
}

/// (all connections, LISTEN connections) the gateway holds on the database.
async fn count_gateway_connections(admin: &tokio_postgres::Client) -> (f64, f64) {
    admin
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE application_name = 'pgfeed-listener')
             FROM pg_stat_activity
             WHERE datname = current_database() AND application_name LIKE 'pgfeed%'
               AND application_name NOT LIKE 'pgfeed-bench%'",
            &[],
        )
        .await
        .map_or((-1.0, -1.0), |r| {
            (r.get::<_, i64>(0) as f64, r.get::<_, i64>(1) as f64)
        })
}

/// Samples the gateway's connections in pg_stat_activity every 25 ms until `stop` and
/// returns the queries they started meanwhile (distinct (pid, query_start)), with their text.
/// Unlike the cumulative statistics views this is not subject to PostgreSQL's delayed
/// statistics flush.
async fn gateway_queries(url: &str, stop: CancellationToken) -> Result<Vec<String>> {
    let client = connect(url).await?;
    let sql = "SELECT pid, coalesce(query_start::text, ''),
                      left(btrim(regexp_replace(query, '\\s+', ' ', 'g')), 70)
               FROM pg_stat_activity
               WHERE datname = current_database() AND application_name LIKE 'pgfeed%'
                 AND application_name NOT LIKE 'pgfeed-bench%'";
    let mut before: std::collections::HashSet<(i32, String)> = Default::default();
    let mut seen: HashMap<(i32, String), String> = HashMap::new();
    let mut first = true;
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        for r in client.query(sql, &[]).await? {
            let key = (r.get::<_, i32>(0), r.get::<_, String>(1));
            if first {
                before.insert(key);
            } else if !before.contains(&key) {
                seen.insert(key, r.get(2));
            }
        }
        first = false;
    }
    Ok(seen.into_values().collect())
}

async fn delivery_run(env: &Env<'_>, run: usize) -> Result<RunResult> {
    let p = env.params;
    let url = &env.db.url;
    let mut out = RunResult::default();
    let admin = connect(url).await?;
    admin
        .batch_execute("SET application_name = 'pgfeed-bench-admin'")
        .await?;
    let base: i64 = admin
        .query_one(
            &format!("SELECT coalesce(max(seq), -1) + 1 FROM public.{TABLE}"),
            &[],
        )
        .await?
        .get(0);
    eprintln!("run {}: starting the gateway ({})", run + 1, p.gateway);
    let gateway = Gateway::start(env.args, url, &env.scratch).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_start = gateway.rss_kib();
    out.set("gw_rss_start_kib", rss_start as f64);

    let floor = if env.args.no_floor {
        None
    } else {
        Some(Floor::start(url)?)
    };

    // Streams.
    let auth = pgfeed::config::AuthConfig::hs256(SECRET);
    let mut tokens = Vec::with_capacity(p.tenants);
    for t in 0..p.tenants {
        let name: Arc<str> = Arc::from(format!("t{t}"));
        let token = pgfeed::auth::mint(&auth, &name, None, Duration::from_secs(4 * 3600))?;
        tokens.push((name, Arc::<str>::from(token)));
    }
    let shared = Arc::new(SubShared {
        live: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        delivered: AtomicU64::new(0),
        last_recv_us: AtomicU64::new(0),
        base,
        write_tenants: p.write_tenants as u64,
        first_error: Mutex::new(None),
    });
    let stop = CancellationToken::new();
    let gate = Arc::new(Semaphore::new(env.args.connect_concurrency.max(1)));
    eprintln!("run {}: opening {} streams", run + 1, p.subscribers);
    let t_connect = Instant::now();
    let total_streams = p.subscribers + p.stalled;
    let mut handles = Vec::with_capacity(total_streams);
    for i in 0..total_streams {
        let t = i % p.tenants;
        let spec = SubSpec {
            addr: gateway.addr,
            source: Ipv4Addr::new(127, 0, 0, 1 + (i % p.source_addrs) as u8),
            tenant: t as u32,
            tenant_name: Arc::clone(&tokens[t].0),
            token: Arc::clone(&tokens[t].1),
            stall: i >= p.subscribers,
        };
        handles.push(tokio::spawn(subscriber(
            spec,
            Arc::clone(&shared),
            Arc::clone(&gate),
            stop.clone(),
        )));
    }
    let open_deadline = Instant::now() + Duration::from_secs(120 + p.subscribers as u64 / 200);
    loop {
        let done = shared.live.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed);
        if done >= total_streams {
            break;
        }
        if Instant::now() > open_deadline {
            eprintln!(
                "run {}: only {done} of {total_streams} streams opened in time",
                run + 1
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let live = shared.live.load(Ordering::Relaxed);
    out.set("connect_s", t_connect.elapsed().as_secs_f64());
    eprintln!(
        "run {}: {live} streams live in {:.1} s; holding {} s",
        run + 1,
        t_connect.elapsed().as_secs_f64(),
        p.hold_s
    );

    // Idle hold: memory per stream and what the gateway asks of the database meanwhile.
    let hold_stop = CancellationToken::new();
    let watcher = tokio::spawn({
        let (url, stop) = (url.clone(), hold_stop.clone());
        async move { gateway_queries(&url, stop).await }
    });
    let hold_start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(p.hold_s)).await;
    hold_stop.cancel();
    let idle_queries = watcher.await??;
    let hold_s = hold_start.elapsed().as_secs_f64();
    if p.hold_s >= 1.0 {
        out.set(
            "idle_queries_per_min",
            idle_queries.len() as f64 * 60.0 / hold_s,
        );
        let mut kinds: Vec<String> = idle_queries;
        kinds.sort();
        kinds.dedup();
        out.idle_queries = kinds;
    }
    let (conns, listeners) = count_gateway_connections(&admin).await;
    out.set("gw_db_connections", conns);
    out.set("gw_listen_connections", listeners);
    let rss_streams = gateway.rss_kib();
    out.set("gw_rss_streams_kib", rss_streams as f64);
    if live > 0 {
        out.set(
            "gw_kib_per_stream",
            (rss_streams as f64 - rss_start as f64) / live as f64,
        );
    }

    // Writes.
    let total_rows_cap = p.changes.unwrap_or(u64::MAX);
    let max_slots = total_rows_cap.div_ceil(p.rows_per_commit as u64);
    let mut clients = Vec::with_capacity(p.writers);
    for _ in 0..p.writers {
        let c = connect(url).await?;
        c.batch_execute(&format!("SET application_name = '{WRITER_APP}'"))
            .await?;
        clients.push(c);
    }
    let sampler = WaitSampler::start(url).await?;
    let disk = env.db.disk_dir().and_then(|dir| DiskProbe::start(&dir));
    let pg_pid = env.db.postmaster_pid();
    let cpu0 = (
        cpu_s(gateway.pid),
        pg_pid.map(tree_cpu_s),
        cpu_s(std::process::id()),
        sys_cpu_s(gateway.pid),
        machine_busy_s(),
        Instant::now(),
    );
    let start = Instant::now() + Duration::from_millis(20);
    let wshared = Arc::new(WriteShared {
        next_slot: AtomicU64::new(0),
        max_slots,
        start,
        rate: p.rate,
        deadline: p.duration_s.map(|d| start + Duration::from_secs_f64(d)),
        rows: p.rows_per_commit as i64,
        base,
        write_tenants: p.write_tenants as i64,
        pad: "x".repeat(p.payload_bytes),
    });
    eprintln!("run {}: writing", run + 1);
    let writers: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(writer(c, Arc::clone(&wshared))))
        .collect();
    let mut committed_slots = Vec::new();
    let mut commit_us = Vec::new();
    let mut write_errors = 0;
    let mut first_sent = u64::MAX;
    for w in writers {
        let r = w.await?;
        committed_slots.extend(r.committed);
        commit_us.extend(r.commit_us);
        write_errors += r.failed;
        if let Some(e) = r.first_error {
            out.first_error.get_or_insert(format!("writer: {e}"));
        }
        if let Some(s) = r.first_sent_us {
            first_sent = first_sent.min(s);
        }
    }
    let write_s = start.elapsed().as_secs_f64();
    out.waits = sampler.finish().await;
    if let Some(disk) = disk {
        let lat = disk.finish();
        for (key, pct) in [("disk_flush_p50_ms", 50.0), ("disk_flush_p90_ms", 90.0)] {
            if let Some(v) = percentile(&lat, pct) {
                out.set(key, v / 1000.0);
            }
        }
    }

    // Expected deliveries: every committed row goes to each subscriber of its tenant.
    let rows = p.rows_per_commit as u64;
    let wt = p.write_tenants as u64;
    let mut committed = vec![false; committed_slots.iter().max().map_or(0, |m| *m as usize + 1)];
    let mut per_tenant = vec![0u64; p.write_tenants];
    for &s in &committed_slots {
        committed[s as usize] = true;
        for r in s * rows..(s + 1) * rows {
            per_tenant[(r % wt) as usize] += 1;
        }
    }
    let mut subs_per_tenant = vec![0u64; p.tenants];
    for i in 0..p.subscribers {
        subs_per_tenant[i % p.tenants] += 1;
    }
    let expected: u64 = (0..p.tenants.min(p.write_tenants))
        .map(|t| per_tenant[t] * subs_per_tenant[t])
        .sum();
    let changes = committed_slots.len() as u64 * rows;
    out.set("commits", committed_slots.len() as f64);
    out.set("changes", changes as f64);
    out.set("write_errors", write_errors as f64);
    out.set("write_s", write_s);
    out.set("commits_per_s", committed_slots.len() as f64 / write_s);
    out.set("changes_per_s", changes as f64 / write_s);
    commit_us.sort_unstable();
    if let Some(v) = percentile(&commit_us, 50.0) {
        out.set("commit_p50_ms", v / 1000.0);
    }
    if let Some(v) = percentile(&commit_us, 99.0) {
        out.set("commit_p99_ms", v / 1000.0);
    }
    out.set("expected", expected as f64);

    // Drain: wait for the outstanding deliveries, giving up after a stretch without progress.
    let mut last_seen = shared.delivered.load(Ordering::Relaxed);
    let mut last_progress = Instant::now();
    loop {
        let now = shared.delivered.load(Ordering::Relaxed);
        if now >= expected {
            break;
        }
        if now != last_seen {
            last_seen = now;
            last_progress = Instant::now();
        } else if last_progress.elapsed().as_secs_f64() > env.args.drain_timeout {
            eprintln!(
                "run {}: gave up waiting: {now} of {expected} deliveries",
                run + 1
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A little longer, so that duplicates and leaks have a chance to show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu1 = (
        cpu_s(gateway.pid),
        pg_pid.map(tree_cpu_s),
        cpu_s(std::process::id()),
        sys_cpu_s(gateway.pid),
        machine_busy_s(),
        Instant::now(),
    );
    out.set("gw_rss_peak_kib", gateway.peak_rss_kib() as f64);
    let gw_cpu = cpu1.0 - cpu0.0;
    out.set("gw_cpu_s", gw_cpu);
    if gw_cpu > 0.0 {
        out.set("gw_sys_pct", 100.0 * (cpu1.3 - cpu0.3) / gw_cpu);
    }
    if let (Some(a), Some(b)) = (cpu0.1, cpu1.1) {
        out.set("pg_cpu_s", b - a);
    }
    if gateway.pid != std::process::id() {
        out.set("bench_cpu_s", cpu1.2 - cpu0.2);
    }
    let window = (cpu1.5 - cpu0.5).as_secs_f64();
    let busy = cpu1.4 - cpu0.4;
    out.set("machine_busy_cores", busy / window);
    if let (Some(a), Some(b)) = (cpu0.1, cpu1.1) {
        // In-process, the gateway's CPU is this process's.
        let bench = if gateway.pid == std::process::id() {
            0.0
        } else {
            cpu1.2 - cpu0.2
        };
        let ours = gw_cpu + (b - a) + bench;
        out.set("other_cpu_cores", (busy - ours).max(0.0) / window);
    }

    stop.cancel();
    let mut results = Vec::with_capacity(handles.len());
    for h in handles {
        results.push(h.await?);
    }
    // Stalled clients read nothing after `live`: only whether they were admitted counts.
    let stalled: Vec<SubResult> = results.split_off(p.subscribers);
    if p.stalled > 0 {
        out.set(
            "stalled_live",
            stalled.iter().filter(|r| r.live).count() as f64,
        );
    }
    out.set(
        "subscribers_live",
        results.iter().filter(|r| r.live).count() as f64,
    );
    let heard = match floor {
        Some(f) => Some(f.finish()?),
        None => None,
    };
    let scraped = scrape_metrics(gateway.addr).await;
    // Matched by suffix: the names carry a `pgfeed_` prefix.
    let metric = |suffix: &str| {
        scraped
            .iter()
            .find(|(k, _)| k.ends_with(suffix))
            .map(|(_, v)| *v)
    };
    for (key, suffix) in [
        ("gw_lagged", "lagged_subscribers_total"),
        ("gw_catchups", "catchups_total"),
        ("gw_journal_reads", "journal_reads_total"),
    ] {
        if let Some(v) = metric(suffix) {
            out.set(key, v);
        }
    }
    if let (Some(sum), Some(n)) = (
        metric("dispatch_latency_seconds_sum"),
        metric("dispatch_latency_seconds_count"),
    ) && n > 0.0
    {
        out.set("gw_dispatch_mean_ms", sum * 1000.0 / n);
    }
    let (warnings, first_warning) = gateway.log_problems();
    out.set("gw_log_warnings", warnings as f64);
    if let Some(w) = first_warning {
        out.first_error.get_or_insert(format!("gateway log: {w}"));
    }
    gateway.stop().await;
    if let Some(e) = shared
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        out.first_error.get_or_insert(format!("stream: {e}"));
    }

    // Correctness and latency.
    let mut received = 0u64;
    let (mut missing, mut duplicated, mut leaks, mut phantom) = (0u64, 0u64, 0u64, 0u64);
    let (mut out_of_order, mut malformed, mut ended, mut failed) = (0u64, 0u64, 0u64, 0u64);
    let mut lat: Vec<u32> = Vec::new();
    let (mut change_frames, mut change_bytes) = (0u64, 0u64);
    for mut r in results {
        received += r.seqs.len() as u64;
        change_frames += r.change_frames;
        change_bytes += r.change_bytes;
        leaks += r.leaks;
        out_of_order += r.out_of_order;
        malformed += r.malformed;
        ended += u64::from(r.ended && !r.failed);
        failed += u64::from(r.failed);
        lat.append(&mut r.lat_us);
        let n = r.seqs.len();
        r.seqs.sort_unstable();
        r.seqs.dedup();
        duplicated += (n - r.seqs.len()) as u64;
        let mut matched = 0u64;
        for &rel in &r.seqs {
            let slot = u64::from(rel) / rows;
            if committed.get(slot as usize).copied().unwrap_or(false) {
                matched += 1;
            } else {
                phantom += 1;
            }
        }
        let t = r.tenant as usize;
        if !r.failed && t < p.write_tenants {
            missing += per_tenant[t].saturating_sub(matched);
        }
    }
    out.set("received", received as f64);
    out.set("missing", missing as f64);
    out.set("duplicated", duplicated as f64);
    out.set("leaks", leaks as f64);
    out.set("phantom", phantom as f64);
    out.set("out_of_order", out_of_order as f64);
    out.set("malformed", malformed as f64);
    out.set("streams_ended", ended as f64);
    out.set("streams_failed", failed as f64);
    let last_recv = shared.last_recv_us.load(Ordering::Relaxed);
    if received > 0 && last_recv > first_sent {
        out.set(
            "deliveries_per_s",
            received as f64 / ((last_recv - first_sent) as f64 / 1e6),
        );
    }
    lat.sort_unstable();
    let pct = |v: &[u32], p: f64| percentile(v, p).map(|x| x / 1000.0);
    for (key, q) in [
        ("p50_ms", 50.0),
        ("p90_ms", 90.0),
        ("p99_ms", 99.0),
        ("p999_ms", 99.9),
        ("max_ms", 100.0),
    ] {
        if let Some(v) = pct(&lat, q) {
            out.set(key, v);
        }
    }
    if let Some(heard) = heard {
        let mut floor = floor_latencies(&heard, first_sent);
        floor.sort_unstable();
        out.set("floor_notifications", floor.len() as f64);
        for (key, q) in [
            ("floor_p50_ms", 50.0),
            ("floor_p90_ms", 90.0),
            ("floor_p99_ms", 99.0),
            ("floor_p999_ms", 99.9),
            ("floor_max_ms", 100.0),
        ] {
            if let Some(v) = pct(&floor, q) {
                out.set(key, v);
            }
        }
        if let (Some(g), Some(f)) = (pct(&lat, 50.0), pct(&floor, 50.0)) {
            out.set("p50_over_floor_ms", g - f);
        }
    }
    if received > 0 {
        out.set("gw_cpu_us_per_delivery", gw_cpu * 1e6 / received as f64);
    }
    if changes > 0 {
        out.set("gw_cpu_us_per_change", gw_cpu * 1e6 / changes as f64);
    }
    if change_frames > 0 {
        let mean = change_bytes as f64 / change_frames as f64;
        out.set("change_frame_bytes", mean);
        set_write_floor(&mut out, mean.round() as usize).await;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Scenario e: pgbench on a watched versus an unwatched table
// ---------------------------------------------------------------------------------------

fn pgbench_binary(args: &Args) -> Result<PathBuf> {
    if let Some(b) = &args.pgbench_bin {
        return Ok(b.clone());
    }
    if let Some(dir) = Search::local().bindir()
        && dir.join("pgbench").exists()
    {
        return Ok(dir.join("pgbench"));
    }
    for dir in std::env::split_paths(&std::env::var("PATH").unwrap_or_default()) {
        if dir.join("pgbench").exists() {
            return Ok(dir.join("pgbench"));
        }
    }
    bail!("pgbench was not found: pass --pgbench-bin (Debian/Ubuntu: it comes with postgresql)")
}

/// Empties the tables and the journal, vacuums and checkpoints, so each run starts alike.
async fn reset_for_pgbench(client: &tokio_postgres::Client) -> Result<()> {
    client
        .batch_execute("TRUNCATE public.pgfeed_bench_plain, public.pgfeed_bench_watched")
        .await?;
    while let Ok(row) = client
        .query_one("SELECT pgfeed.prune(interval '0', 100000)", &[])
        .await
    {
        if row.get::<_, i32>(0) <= 0 {
            break;
        }
    }
    for sql in [
        "VACUUM ANALYZE public.pgfeed_bench_plain",
        "VACUUM ANALYZE public.pgfeed_bench_watched",
        "VACUUM ANALYZE pgfeed.changes",
        "VACUUM ANALYZE pgfeed.commits",
        "CHECKPOINT",
    ] {
        // CHECKPOINT needs a superuser (or pg_checkpoint); without it, runs are noisier.
        let _ = client.batch_execute(sql).await;
    }
    Ok(())
}

async fn pgbench_run(
    bin: &Path,
    url: &str,
    script: &Path,
    clients: u32,
    seconds: u32,
) -> Result<f64> {
    let (bin, url, script) = (bin.to_path_buf(), url.to_string(), script.to_path_buf());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&bin)
            .args([
                "-n",
                "-M",
                "prepared",
                "-c",
                &clients.to_string(),
                "-j",
                &clients.to_string(),
                "-T",
                &seconds.to_string(),
                "-f",
            ])
            .arg(&script)
            .arg(&url)
            .env("PGAPPNAME", "pgbench")
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l["tps = ".len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no tps in pgbench output: {stdout}"))
}

async fn pgbench_scenario(env: &Env<'_>) -> Result<Value> {
    let p = env.params;
    let url = &env.db.url;
    let bin = pgbench_binary(env.args)?;
    let mut client = connect(url).await?;
    pgfeed::schema::install(&mut client).await?;
    client
        .batch_execute(
            "SELECT pgfeed.unwatch(tbl) FROM pgfeed.watched
               WHERE tbl IN (to_regclass('public.pgfeed_bench_watched'), to_regclass('public.pgfeed_bench_plain'));
             DROP TABLE IF EXISTS public.pgfeed_bench_plain, public.pgfeed_bench_watched;
             CREATE TABLE public.pgfeed_bench_plain (id bigserial PRIMARY KEY, tenant text NOT NULL,
                                              sent_us bigint NOT NULL DEFAULT 0, pad text);
             CREATE TABLE public.pgfeed_bench_watched (LIKE public.pgfeed_bench_plain INCLUDING ALL);
             SELECT pgfeed.watch('public.pgfeed_bench_watched', 'tenant');",
        )
        .await?;
    let scripts = [("1 row/statement", 1u32), ("100 rows/statement", 100u32)];
    // Variants: the plain table; the plain table plus one NOTIFY per statement (in the
    // same statement, so the same round trips: what NOTIFY alone costs); the watched table.
    let mut files = HashMap::new();
    for variant in ["plain", "notify", "watched"] {
        let table = if variant == "watched" {
            "watched"
        } else {
            "plain"
        };
        for (_, rows) in scripts {
            let insert = if rows == 1 {
                format!(
                    "INSERT INTO pgfeed_bench_{table} (tenant, pad) VALUES ('t' || :t, repeat('x', {}))",
                    p.payload_bytes
                )
            } else {
                format!(
                    "INSERT INTO pgfeed_bench_{table} (tenant, pad) SELECT 't' || (g % 100), repeat('x', {}) FROM generate_series(1, {rows}) AS g",
                    p.payload_bytes
                )
            };
            let statement = if variant == "notify" {
                format!(
                    "WITH i AS ({insert} RETURNING 1) SELECT pg_notify('pgfeed_bench_floor', count(*)::text) FROM i"
                )
            } else {
                insert
            };
            let sql = format!("\\set t random(0, 99)\n{statement};\n");
            let path = env.scratch.join(format!("pgbench-{variant}-{rows}.sql"));
            std::fs::write(&path, sql)?;
            files.insert((variant, rows), path);
        }
    }
    // (workload, clients, variant) -> tps per run, waits of the last run
    type Key = (u32, u32, &'static str);
    let mut tps: HashMap<Key, Vec<f64>> = HashMap::new();
    let mut waits: HashMap<Key, Vec<(String, f64)>> = HashMap::new();
    let variants_without = [
        ("plain", "unwatched"),
        ("notify", "unwatched+NOTIFY"),
        ("watched", "watched"),
    ];
    // Phase 1: no gateway. Phase 2: the gateway running (listening, reading the journal,
    // no subscribers), on the watched table.
    for phase in 0..2 {
        let gateway = if phase == 1 {
            Some(Gateway::start(env.args, url, &env.scratch).await?)
        } else {
            None
        };
        for run in 0..p.runs {
            for (_, rows) in scripts {
                for &clients in &p.pgbench_clients {
                    let variants: &[(&str, &'static str)] = if phase == 0 {
                        &variants_without
                    } else {
                        &[("watched", "watched+gateway")]
                    };
                    for &(table, label) in variants {
                        reset_for_pgbench(&client).await?;
                        let sampler = WaitSampler::start(url).await?;
                        let t = pgbench_run(
                            &bin,
                            url,
                            &files[&(table, rows)],
                            clients,
                            p.pgbench_seconds,
                        )
                        .await?;
                        let w = sampler.finish().await;
                        eprintln!(
                            "run {}: {label:<16} {rows:>3} rows/stmt {clients:>2} clients: {t:>9.1} tps   waits: {}",
                            run + 1,
                            waits_text(&w)
                        );
                        tps.entry((rows, clients, label)).or_default().push(t);
                        waits.insert((rows, clients, label), w);
                    }
                }
            }
        }
        if let Some(g) = gateway {
            g.stop().await;
        }
    }
    let mut rows_json = Vec::new();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\npgfeed-bench preset e: pgbench INSERTs, {} s per run, median of {} runs; fsync {}",
        p.pgbench_seconds,
        p.runs,
        if p.fsync { "on" } else { "off" }
    );
    let _ = writeln!(
        out,
        "{:<20}{:>8}{:>11}{:>11}{:>7}{:>11}{:>7}{:>11}{:>7}   where watched+gateway writers waited",
        "workload",
        "clients",
        "unwatched",
        "+NOTIFY",
        "ratio",
        "watched",
        "ratio",
        "+gateway",
        "ratio",
    );
    let mut ok_75 = true;
    for (name, rows) in scripts {
        for &clients in &p.pgbench_clients {
            let med = |label: &str| {
                let mut v = tps
                    .get(&(rows, clients, label))
                    .cloned()
                    .unwrap_or_default();
                median(&mut v)
            };
            let plain = med("unwatched");
            let notify = med("unwatched+NOTIFY");
            let watched = med("watched");
            let with_gw = med("watched+gateway");
            let ratio = |x: Option<f64>| match (x, plain) {
                (Some(x), Some(p)) if p > 0.0 => Some(x / p),
                _ => None,
            };
            let w = waits
                .get(&(rows, clients, "watched+gateway"))
                .cloned()
                .unwrap_or_default();
            if rows == 1 && clients == 1 && ratio(watched).is_some_and(|r| r < 0.75) {
                ok_75 = false;
            }
            let pct =
                |x: Option<f64>| ratio(x).map_or("-".into(), |r| format!("{:.0}%", r * 100.0));
            let _ = writeln!(
                out,
                "{name:<20}{clients:>8}{:>11}{:>11}{:>7}{:>11}{:>7}{:>11}{:>7}   {}",
                fmt_value(plain),
                fmt_value(notify),
                pct(notify),
                fmt_value(watched),
                pct(watched),
                fmt_value(with_gw),
                pct(with_gw),
                waits_text(&w)
            );
            for label in [
                "unwatched",
                "unwatched+NOTIFY",
                "watched",
                "watched+gateway",
            ] {
                let runs = tps
                    .get(&(rows, clients, label))
                    .cloned()
                    .unwrap_or_default();
                let mut sorted = runs.clone();
                let m = median(&mut sorted);
                rows_json.push(json!({
                    "rows_per_statement": rows,
                    "clients": clients,
                    "table": label,
                    "tps_runs": runs.iter().map(|v| round3(*v)).collect::<Vec<_>>(),
                    "tps_median": m.map(round3),
                    "rows_per_s_median": m.map(|m| round3(m * f64::from(rows))),
                    "ratio_to_unwatched": ratio(m).map(round3),
                    "db_waits": waits.get(&(rows, clients, label)).map(|w| w.iter().map(|(k, p)| json!({"wait": k, "pct": round3(*p)})).collect::<Vec<_>>()),
                }));
            }
        }
    }
    let _ = writeln!(
        out,
        "target: single-row, 1 client, watched >= 75% of unwatched: {}",
        if ok_75 { "met" } else { "MISSED" }
    );
    print!("{out}");
    Ok(json!({ "pgbench": rows_json, "target_75pct_met": ok_75 }))
}

// ---------------------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------------------

fn machine() -> Value {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    json!({ "cpus": cpus, "mem_gib": (mem_kib as f64 / 1048576.0).round(), "cpu_model": model, "loadavg_at_start": loadavg })
}

async fn run_main(args: Args) -> Result<bool> {
    let params = Params::resolve(&args)?;
    // Each stream is a socket here and one in the gateway (twice here when in-process).
    let per_stream = if args.gateway == GatewayMode::InProcess {
        2
    } else {
        1
    };
    let need = (params.subscribers * per_stream) as u64 + 512;
    let fds = raise_nofile(need.max(4096));
    if fds < need {
        bail!(
            "{} streams need an open-file limit of about {need} (in this process and in the \
             gateway), but it is {fds} and could not be raised: the hard limit needs root with \
             CAP_SYS_RESOURCE to grow. Raise it (`ulimit -Hn`, LimitNOFILE=) or use at most \
             --subscribers {}",
            params.subscribers,
            fds.saturating_sub(512) / per_stream as u64
        );
    }
    let machine = machine();
    let scratch = std::env::temp_dir().join(format!("pgfeed-bench-scratch-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    eprintln!("pgfeed-bench: preset {}", params.preset);
    let db = Database::open(&args, params.fsync).await?;
    let env = Env {
        args: &args,
        params: &params,
        db: &db,
        scratch: scratch.clone(),
    };
    let result = async {
        if args.preset == Preset::E {
            let v = pgbench_scenario(&env).await?;
            let line = json!({
                "bench": "pgfeed",
                "preset": params.preset,
                "params": params,
                "machine": machine,
                "ok": true,
                "write_path": v,
            });
            println!("{line}");
            return Ok::<bool, anyhow::Error>(true);
        }
        setup_table(&db.url, !args.no_floor).await?;
        let mut runs = Vec::new();
        for run in 0..params.runs {
            runs.push(delivery_run(&env, run).await?);
        }
        let (line, ok) = report_delivery(&params, &runs, &machine);
        println!("{line}");
        Ok(ok)
    }
    .await;
    db.close().await;
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run_main(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
