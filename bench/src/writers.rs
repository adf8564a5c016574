//! The load: K writer connections commit the run's rows (one INSERT statement per
//! commit, `rows_per_commit` rows, spread over the write tenants), paced to the rate or
//! unpaced, until the duration or the row count is reached. Each row carries its send
//! time (`sent_us`), from which the streams time its delivery.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::cli::Params;
use crate::database::connect;
use crate::measure::now_us;
use crate::{TABLE, WRITER_APP};

/// What the writers share: the next commit slot and the pacing.
pub(crate) struct WriteShared {
    pub(crate) next_slot: AtomicU64,
    pub(crate) max_slots: u64,
    pub(crate) start: Instant,
    pub(crate) rate: f64,
    pub(crate) deadline: Option<Instant>,
    pub(crate) rows: i64,
    pub(crate) base: i64,
    pub(crate) write_tenants: i64,
    pub(crate) pad: String,
}

/// What one writer did.
#[derive(Default)]
pub(crate) struct WriterResult {
    pub(crate) committed: Vec<u64>,
    pub(crate) failed: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) commit_us: Vec<u32>,
    pub(crate) first_sent_us: Option<u64>,
}

/// One writer connection: takes slots until none is left or the deadline passes.
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
/// The writer connections, opened before the clock starts.
pub(crate) async fn connect_writers(url: &str, n: usize) -> Result<Vec<tokio_postgres::Client>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let c = connect(url).await?;
        c.batch_execute(&format!("SET application_name = '{WRITER_APP}'"))
            .await?;
        clients.push(c);
    }
    Ok(clients)
}

/// What the write phase did, over all writers.
pub(crate) struct Written {
    /// Slots (commits) that committed.
    pub(crate) committed_slots: Vec<u64>,
    /// Round trip of every commit, in µs, unsorted.
    pub(crate) commit_us: Vec<u32>,
    pub(crate) write_errors: u64,
    pub(crate) first_error: Option<String>,
    /// Send time of the first row written (µs since the epoch; `u64::MAX` if none).
    pub(crate) first_sent: u64,
    /// Seconds from the start until the last writer finished.
    pub(crate) write_s: f64,
}

/// Writes the run's rows from `base` on over `clients`, starting 20 ms from now.
pub(crate) async fn write(
    p: &Params,
    clients: Vec<tokio_postgres::Client>,
    base: i64,
) -> Result<Written> {
    let total_rows_cap = p.changes.unwrap_or(u64::MAX);
    let max_slots = total_rows_cap.div_ceil(p.rows_per_commit as u64);
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
    let writers: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(writer(c, Arc::clone(&wshared))))
        .collect();
    let mut out = Written {
        committed_slots: Vec::new(),
        commit_us: Vec::new(),
        write_errors: 0,
        first_error: None,
        first_sent: u64::MAX,
        write_s: 0.0,
    };
    for w in writers {
        let r = w.await?;
        out.committed_slots.extend(r.committed);
        out.commit_us.extend(r.commit_us);
        out.write_errors += r.failed;
        if let Some(e) = r.first_error {
            out.first_error.get_or_insert(e);
        }
        if let Some(s) = r.first_sent_us {
            out.first_sent = out.first_sent.min(s);
        }
    }
    out.write_s = start.elapsed().as_secs_f64();
    Ok(out)
}
