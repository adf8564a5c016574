//! What PostgreSQL and its disk do during a run: the disk's flush latency
//! ([`DiskProbe`]), where the writers wait ([`WaitSampler`], pg_stat_activity), and the
//! gateway's connections and the queries it runs while the streams are idle.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::WRITER_APP;
use crate::database::connect;

/// Durable notifying commits are serialized through the WAL flush, so the disk's flush
/// latency bounds the commit rate, and it drifts on a virtual machine (0.07 to 0.5 ms
/// idle within one hour here). While the writers run, this overwrites 32 KiB and calls
/// fdatasync every 50 ms (about 640 KiB/s) in a file beside the cluster, so every report
/// shows what the disk did in that run.
pub(crate) struct DiskProbe {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) thread: Option<std::thread::JoinHandle<Vec<u32>>>,
}

impl DiskProbe {
    pub(crate) const BLOCK: usize = 32 * 1024;
    pub(crate) const BLOCKS: u64 = 128;

    /// Writes the file whole first (so that the timed writes allocate nothing), before
    /// the caller starts its clock.
    pub(crate) fn start(dir: &Path) -> Option<DiskProbe> {
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
    pub(crate) fn finish(mut self) -> Vec<u32> {
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

pub(crate) struct WaitSampler {
    pub(crate) stop: CancellationToken,
    pub(crate) task: tokio::task::JoinHandle<HashMap<String, u64>>,
}

impl WaitSampler {
    pub(crate) async fn start(url: &str) -> Result<WaitSampler> {
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
    pub(crate) async fn finish(self) -> Vec<(String, f64)> {
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

pub(crate) fn waits_text(waits: &[(String, f64)]) -> String {
    waits
        .iter()
        .map(|(k, p)| format!("{k} {p:.0}%"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// (all connections, LISTEN connections) the gateway holds on the database.
pub(crate) async fn count_gateway_connections(admin: &tokio_postgres::Client) -> (f64, f64) {
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
pub(crate) async fn gateway_queries(url: &str, stop: CancellationToken) -> Result<Vec<String>> {
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
