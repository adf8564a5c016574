//! A delivery run's figures out of what was written, measured and received: the
//! deliveries expected from the committed rows, the correctness counts (missing,
//! duplicated, leaked, phantom, out of order), latency percentiles against the raw
//! LISTEN floor, and CPU per delivery.

use std::collections::HashMap;

use crate::cli::Params;
use crate::floor::floor_latencies;
use crate::measure::{CpuSnapshot, percentile};
use crate::report::RunResult;
use crate::subscribers::SubResult;
use crate::writers::Written;

/// What the committed rows mean for the streams.
pub(crate) struct Expected {
    /// Whether each slot (commit) committed.
    committed: Vec<bool>,
    /// Rows committed for each write tenant.
    per_tenant: Vec<u64>,
    /// Deliveries expected: every committed row goes to each subscriber of its tenant.
    pub(crate) deliveries: u64,
    /// Rows committed.
    pub(crate) changes: u64,
}

impl Expected {
    pub(crate) fn new(p: &Params, committed_slots: &[u64]) -> Expected {
        let rows = p.rows_per_commit as u64;
        let wt = p.write_tenants as u64;
        let mut committed =
            vec![false; committed_slots.iter().max().map_or(0, |m| *m as usize + 1)];
        let mut per_tenant = vec![0u64; p.write_tenants];
        for &s in committed_slots {
            committed[s as usize] = true;
            for r in s * rows..(s + 1) * rows {
                per_tenant[(r % wt) as usize] += 1;
            }
        }
        let mut subs_per_tenant = vec![0u64; p.tenants];
        for i in 0..p.subscribers {
            subs_per_tenant[i % p.tenants] += 1;
        }
        let deliveries = (0..p.tenants.min(p.write_tenants))
            .map(|t| per_tenant[t] * subs_per_tenant[t])
            .sum();
        Expected {
            committed,
            per_tenant,
            deliveries,
            changes: committed_slots.len() as u64 * rows,
        }
    }
}

/// The write phase's figures.
pub(crate) fn set_write_figures(out: &mut RunResult, w: &mut Written, expected: &Expected) {
    let commits = w.committed_slots.len() as f64;
    out.set("commits", commits);
    out.set("changes", expected.changes as f64);
    out.set("write_errors", w.write_errors as f64);
    out.set("write_s", w.write_s);
    out.set("commits_per_s", commits / w.write_s);
    out.set("changes_per_s", expected.changes as f64 / w.write_s);
    w.commit_us.sort_unstable();
    if let Some(v) = percentile(&w.commit_us, 50.0) {
        out.set("commit_p50_ms", v / 1000.0);
    }
    if let Some(v) = percentile(&w.commit_us, 99.0) {
        out.set("commit_p99_ms", v / 1000.0);
    }
    out.set("expected", expected.deliveries as f64);
}

/// CPU figures between two snapshots; returns the gateway's CPU seconds.
pub(crate) fn set_cpu_figures(
    out: &mut RunResult,
    cpu0: &CpuSnapshot,
    cpu1: &CpuSnapshot,
    gateway_pid: u32,
) -> f64 {
    let in_process = gateway_pid == std::process::id();
    let gw_cpu = cpu1.gateway - cpu0.gateway;
    out.set("gw_cpu_s", gw_cpu);
    if gw_cpu > 0.0 {
        out.set(
            "gw_sys_pct",
            100.0 * (cpu1.gateway_sys - cpu0.gateway_sys) / gw_cpu,
        );
    }
    if let (Some(a), Some(b)) = (cpu0.postgres, cpu1.postgres) {
        out.set("pg_cpu_s", b - a);
    }
    if !in_process {
        out.set("bench_cpu_s", cpu1.bench - cpu0.bench);
    }
    let window = (cpu1.at - cpu0.at).as_secs_f64();
    let busy = cpu1.machine_busy - cpu0.machine_busy;
    out.set("machine_busy_cores", busy / window);
    if let (Some(a), Some(b)) = (cpu0.postgres, cpu1.postgres) {
        // In-process, the gateway's CPU is this process's.
        let bench = if in_process {
            0.0
        } else {
            cpu1.bench - cpu0.bench
        };
        let ours = gw_cpu + (b - a) + bench;
        out.set("other_cpu_cores", (busy - ours).max(0.0) / window);
    }
    gw_cpu
}

/// The gateway's own counters, scraped from /metrics after the run.
pub(crate) fn set_metric_figures(out: &mut RunResult, scraped: &HashMap<String, f64>) {
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
}

/// What the subscribers received, over all of them.
pub(crate) struct Delivered {
    pub(crate) received: u64,
    /// Latency of every delivery in µs, sorted.
    pub(crate) lat_us: Vec<u32>,
    pub(crate) change_frames: u64,
    pub(crate) change_bytes: u64,
}

/// The correctness counts of the subscribers' `results` against what was committed.
pub(crate) fn set_correctness_figures(
    out: &mut RunResult,
    p: &Params,
    results: Vec<SubResult>,
    expected: &Expected,
) -> Delivered {
    let rows = p.rows_per_commit as u64;
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
            if expected
                .committed
                .get(slot as usize)
                .copied()
                .unwrap_or(false)
            {
                matched += 1;
            } else {
                phantom += 1;
            }
        }
        let t = r.tenant as usize;
        if !r.failed && t < p.write_tenants {
            missing += expected.per_tenant[t].saturating_sub(matched);
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
    lat.sort_unstable();
    Delivered {
        received,
        lat_us: lat,
        change_frames,
        change_bytes,
    }
}

/// Deliveries per second (from the first row's send time to the last receipt), latency
/// percentiles, and the floor's (`heard`: its notifications) over the same writes.
pub(crate) fn set_latency_figures(
    out: &mut RunResult,
    d: &Delivered,
    first_sent: u64,
    last_recv: u64,
    heard: Option<&[(i64, u64)]>,
) {
    if d.received > 0 && last_recv > first_sent {
        out.set(
            "deliveries_per_s",
            d.received as f64 / ((last_recv - first_sent) as f64 / 1e6),
        );
    }
    let lat = &d.lat_us;
    let pct = |v: &[u32], p: f64| percentile(v, p).map(|x| x / 1000.0);
    for (key, q) in [
        ("p50_ms", 50.0),
        ("p90_ms", 90.0),
        ("p99_ms", 99.0),
        ("p999_ms", 99.9),
        ("max_ms", 100.0),
    ] {
        if let Some(v) = pct(lat, q) {
            out.set(key, v);
        }
    }
    if let Some(heard) = heard {
        let mut floor = floor_latencies(heard, first_sent);
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
        if let (Some(g), Some(f)) = (pct(lat, 50.0), pct(&floor, 50.0)) {
            out.set("p50_over_floor_ms", g - f);
        }
    }
}
