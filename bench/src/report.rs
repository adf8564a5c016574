//! Results: the figures of a delivery run ([`FIGURES`], [`RunResult`]), combined over
//! runs into the human table on stdout and the JSON line starting with `{"bench":`.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::cli::Params;
use crate::measure::median;
use crate::pgmeasure::waits_text;

/// How a figure is combined over runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Agg {
    Median,
    Sum,
}

/// (key, label, aggregation) of every figure a delivery run reports, in display order.
pub(crate) const FIGURES: &[(&str, &str, Agg)] = &[
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
pub(crate) struct RunResult {
    pub(crate) figures: HashMap<&'static str, f64>,
    pub(crate) waits: Vec<(String, f64)>,
    pub(crate) first_error: Option<String>,
    /// Distinct texts of the queries the gateway ran during the idle hold.
    pub(crate) idle_queries: Vec<String>,
}

impl RunResult {
    pub(crate) fn set(&mut self, key: &'static str, value: f64) {
        assert!(FIGURES.iter().any(|(k, _, _)| *k == key), "{key}");
        self.figures.insert(key, value);
    }
}

pub(crate) fn fmt_value(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{v:.0}"),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 1.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.3}"),
    }
}

pub(crate) fn round3(v: f64) -> Value {
    json!((v * 1000.0).round() / 1000.0)
}

/// Prints the table and returns the JSON summary.
pub(crate) fn report_delivery(p: &Params, runs: &[RunResult], machine: &Value) -> (Value, bool) {
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
