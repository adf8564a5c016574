//! A delivery run (scenarios a to d, smoke): start the gateway, open the streams, hold
//! them idle (memory per stream, the gateway's queries meanwhile), write, wait for the
//! deliveries, then collect the figures. The raw LISTEN floor hears the same commits in
//! the same run; the `write()` floor is measured once the gateway has stopped.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::TABLE;
use crate::cli::{Args, Params};
use crate::database::{Database, connect};
use crate::floor::{Floor, set_write_floor};
use crate::gateway::{Gateway, scrape_metrics};
use crate::measure::{CpuSnapshot, percentile};
use crate::pgmeasure::{DiskProbe, WaitSampler, count_gateway_connections, gateway_queries};
use crate::report::RunResult;
use crate::subscribers::Streams;
use crate::tally::{
    Expected, set_correctness_figures, set_cpu_figures, set_latency_figures, set_metric_figures,
    set_write_figures,
};
use crate::writers::{connect_writers, write};

/// What every run of an invocation shares.
pub(crate) struct Env<'a> {
    pub(crate) args: &'a Args,
    pub(crate) params: &'a Params,
    pub(crate) db: &'a Database,
    /// A directory for the gateway's log and pgbench's scripts.
    pub(crate) scratch: PathBuf,
}

/// One delivery run (`run` counts from 0).
pub(crate) async fn delivery_run(env: &Env<'_>, run: usize) -> Result<RunResult> {
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

    let streams = Streams::open(p, env.args.connect_concurrency, gateway.addr, base, run).await?;
    out.set("connect_s", streams.connect_s);
    eprintln!(
        "run {}: {} streams live in {:.1} s; holding {} s",
        run + 1,
        streams.live,
        streams.connect_s,
        p.hold_s
    );
    idle_hold(&mut out, env, &admin, &gateway, streams.live, rss_start).await?;

    // Writes, with the database's waits, the disk and the CPU measured meanwhile.
    let clients = connect_writers(url, p.writers).await?;
    let sampler = WaitSampler::start(url).await?;
    let disk = env.db.disk_dir().and_then(|dir| DiskProbe::start(&dir));
    let pg_pid = env.db.postmaster_pid();
    let cpu0 = CpuSnapshot::take(gateway.pid, pg_pid);
    eprintln!("run {}: writing", run + 1);
    let mut written = write(p, clients, base).await?;
    if let Some(e) = written.first_error.take() {
        out.first_error.get_or_insert(format!("writer: {e}"));
    }
    out.waits = sampler.finish().await;
    if let Some(disk) = disk {
        let lat = disk.finish();
        for (key, pct) in [("disk_flush_p50_ms", 50.0), ("disk_flush_p90_ms", 90.0)] {
            if let Some(v) = percentile(&lat, pct) {
                out.set(key, v / 1000.0);
            }
        }
    }
    let expected = Expected::new(p, &written.committed_slots);
    set_write_figures(&mut out, &mut written, &expected);

    streams
        .drain(expected.deliveries, env.args.drain_timeout, run)
        .await;
    let cpu1 = CpuSnapshot::take(gateway.pid, pg_pid);
    out.set("gw_rss_peak_kib", gateway.peak_rss_kib() as f64);
    let gw_cpu = set_cpu_figures(&mut out, &cpu0, &cpu1, gateway.pid);

    let shared = std::sync::Arc::clone(&streams.shared);
    let (results, stalled) = streams.finish().await?;
    // Stalled clients read nothing after `live`: only whether they were admitted counts.
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
    set_metric_figures(&mut out, &scrape_metrics(gateway.addr).await);
    let (warnings, first_warning) = gateway.log_problems();
    out.set("gw_log_warnings", warnings as f64);
    if let Some(w) = first_warning {
        out.first_error.get_or_insert(format!("gateway log: {w}"));
    }
    gateway.stop().await;
    if let Some(e) = shared.take_first_error() {
        out.first_error.get_or_insert(format!("stream: {e}"));
    }

    let delivered = set_correctness_figures(&mut out, p, results, &expected);
    let last_recv = shared
        .last_recv_us
        .load(std::sync::atomic::Ordering::Relaxed);
    set_latency_figures(
        &mut out,
        &delivered,
        written.first_sent,
        last_recv,
        heard.as_deref(),
    );
    if delivered.received > 0 {
        out.set(
            "gw_cpu_us_per_delivery",
            gw_cpu * 1e6 / delivered.received as f64,
        );
    }
    if expected.changes > 0 {
        out.set(
            "gw_cpu_us_per_change",
            gw_cpu * 1e6 / expected.changes as f64,
        );
    }
    if delivered.change_frames > 0 {
        let mean = delivered.change_bytes as f64 / delivered.change_frames as f64;
        out.set("change_frame_bytes", mean);
        set_write_floor(&mut out, mean.round() as usize).await;
    }
    Ok(out)
}

/// The idle hold: memory per stream, and what the gateway asks of the database meanwhile.
async fn idle_hold(
    out: &mut RunResult,
    env: &Env<'_>,
    admin: &tokio_postgres::Client,
    gateway: &Gateway,
    live: usize,
    rss_start: u64,
) -> Result<()> {
    let p = env.params;
    let hold_stop = CancellationToken::new();
    let watcher = tokio::spawn({
        let (url, stop) = (env.db.url.clone(), hold_stop.clone());
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
    let (conns, listeners) = count_gateway_connections(admin).await;
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
    Ok(())
}
