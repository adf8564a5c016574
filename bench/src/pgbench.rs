//! Scenario e: pgbench INSERTs on an unwatched table, the same with a NOTIFY per
//! statement, and a watched table, without and then with the gateway running; the
//! database's waits sampled meanwhile.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, anyhow, bail};
use pgfeed::cluster::Search;
use serde_json::{Value, json};

use crate::cli::{Args, Params};
use crate::database::connect;
use crate::gateway::Gateway;
use crate::measure::median;
use crate::pgmeasure::{WaitSampler, waits_text};
use crate::report::{fmt_value, round3};
use crate::scenario::Env;

pub(crate) fn pgbench_binary(args: &Args) -> Result<PathBuf> {
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
pub(crate) async fn reset_for_pgbench(client: &tokio_postgres::Client) -> Result<()> {
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

pub(crate) async fn pgbench_run(
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

pub(crate) async fn pgbench_scenario(env: &Env<'_>) -> Result<Value> {
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
    let files = write_scripts(env)?;
    let (tps, waits) = run_phases(env, &client, &bin, &files).await?;
    let (rows_json, ok_75) = print_table(p, &tps, &waits);
    Ok(json!({ "pgbench": rows_json, "target_75pct_met": ok_75 }))
}

/// The workloads: (name, rows per statement).
const SCRIPTS: [(&str, u32); 2] = [("1 row/statement", 1), ("100 rows/statement", 100)];

/// (rows per statement, clients, variant label).
type Key = (u32, u32, &'static str);
/// pgbench's tps of every run, by key.
type Tps = HashMap<Key, Vec<f64>>;
/// The database's top waits during the last run, by key.
type Waits = HashMap<Key, Vec<(String, f64)>>;

/// Writes pgbench's script of each variant and workload into the scratch directory.
/// Variants: the plain table; the plain table plus one NOTIFY per statement (in the same
/// statement, so the same round trips: what NOTIFY alone costs); the watched table.
fn write_scripts(env: &Env<'_>) -> Result<HashMap<(&'static str, u32), PathBuf>> {
    let p = env.params;
    let mut files = HashMap::new();
    for variant in ["plain", "notify", "watched"] {
        let table = if variant == "watched" {
            "watched"
        } else {
            "plain"
        };
        for (_, rows) in SCRIPTS {
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
    Ok(files)
}

/// Runs every variant, workload and client count `p.runs` times: first without a gateway,
/// then with the gateway running (listening, reading the journal, no subscribers) on the
/// watched table.
async fn run_phases(
    env: &Env<'_>,
    client: &tokio_postgres::Client,
    bin: &Path,
    files: &HashMap<(&'static str, u32), PathBuf>,
) -> Result<(Tps, Waits)> {
    let p = env.params;
    let url = &env.db.url;
    let mut tps = Tps::new();
    let mut waits = Waits::new();
    let variants_without = [
        ("plain", "unwatched"),
        ("notify", "unwatched+NOTIFY"),
        ("watched", "watched"),
    ];
    // Phase 0: no gateway. Phase 1: the gateway running.
    for phase in 0..2 {
        let gateway = if phase == 1 {
            Some(Gateway::start(env.args, url, &env.scratch).await?)
        } else {
            None
        };
        for run in 0..p.runs {
            for (_, rows) in SCRIPTS {
                for &clients in &p.pgbench_clients {
                    let variants: &[(&str, &'static str)] = if phase == 0 {
                        &variants_without
                    } else {
                        &[("watched", "watched+gateway")]
                    };
                    for &(table, label) in variants {
                        reset_for_pgbench(client).await?;
                        let sampler = WaitSampler::start(url).await?;
                        let t = pgbench_run(
                            bin,
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
    Ok((tps, waits))
}

/// Prints the table (median tps and the ratio to the unwatched table) and returns its
/// JSON rows and whether the target (single-row, 1 client, watched at least 75 % of
/// unwatched) was met.
fn print_table(p: &Params, tps: &Tps, waits: &Waits) -> (Vec<Value>, bool) {
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
    for (name, rows) in SCRIPTS {
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
    (rows_json, ok_75)
}
