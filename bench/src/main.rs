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
//!
//! Files: `cli` (flags and presets), `scenario` (a delivery run) with `subscribers` and
//! `received` (the streams), `writers` (the load), `tally` (the run's figures), `floor`
//! (the raw LISTEN and `write()` floors), `gateway`, `database`, `pgmeasure` (PostgreSQL's
//! waits and the disk), `measure` (clocks and /proc), `pgbench` (scenario e) and `report`
//! (the table and the JSON line).

mod cli;
mod database;
mod floor;
mod gateway;
mod measure;
mod pgbench;
mod pgmeasure;
mod received;
mod report;
mod scenario;
mod subscribers;
mod tally;
mod writers;

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Parser;
use serde_json::{Value, json};

use crate::cli::{Args, GatewayMode, Params, Preset};
use crate::database::{Database, setup_table};
use crate::measure::raise_nofile;
use crate::pgbench::pgbench_scenario;
use crate::report::report_delivery;
use crate::scenario::{Env, delivery_run};

/// HS256 secret of the benchmark's gateway.
const SECRET: &str = "pgfeed-bench-secret-0123456789abcdef";
/// The watched table of the delivery scenarios.
const TABLE: &str = "pgfeed_bench";
/// `application_name` of the writer connections (the wait-event sampler looks for it).
const WRITER_APP: &str = "pgfeed-bench-writer";

/// The machine, for the JSON line.
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

/// One invocation: `Ok(false)` when a delivery run was not correct.
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
