//! Counters, gauges and histograms, and their Prometheus text rendering for `/metrics`.
//!
//! Labels are bounded: table and op for events, a fixed reason for rejections, a fixed
//! kind for journal reads. Never a tenant, a token or a row value. Hot paths count in
//! batches (one increment per chunk written, per batch published), not per delivery.
//! One gauge is sampled from the database at scrape time
//! ([`Metrics::sample_notification_queue`]).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::change::Change;
use crate::db::{Db, QueryError, decode};

/// Labels of `pgfeed_events_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// Qualified table name (bounded by the number of watched tables).
    pub table: String,
    /// insert, update, delete, truncate.
    pub op: String,
}

/// Labels with a reason or kind from a fixed set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// One of a fixed set of values.
    pub reason: String,
}

/// Labels of `pgfeed_journal_reads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `listener`, `replay` or `catchup`.
    pub kind: String,
}

/// Every metric the gateway exports.
pub struct Metrics {
    /// The registry they are encoded from.
    registry: Registry,
    /// Open streams (set at scrape time from the hub).
    pub subscribers: Gauge,
    /// Tenants with a live channel, i.e. with open streams (set at scrape time).
    pub tenant_channels: Gauge,
    /// Streams opened.
    pub streams_opened: Counter,
    /// Streams refused, by reason.
    pub streams_rejected: Family<ReasonLabel, Counter>,
    /// Changes received from the journal by the listener, by table and op.
    pub events: Family<EventLabels, Counter>,
    /// Change frames written to subscribers.
    pub deliveries: Counter,
    /// Bytes written to streams.
    pub bytes_written: Counter,
    /// Times a subscriber fell behind the live buffer.
    pub lagged: Counter,
    /// Catch-ups of lagged subscribers completed (back to live).
    pub catchups: Counter,
    /// Journal reads, by kind.
    pub journal_reads: Family<KindLabel, Counter>,
    /// `reset` events sent (resume from a pruned position).
    pub resets: Counter,
    /// Listener connections lost (each followed by a reconnect).
    pub listener_reconnects: Counter,
    /// 1 while the listener is connected and caught up.
    pub listener_ready: Gauge,
    /// `pg_notification_queue_usage()` at the last scrape (0..1).
    pub notification_queue_usage: Gauge<f64, AtomicU64>,
    /// Seconds from a change's commit to its publication to subscribers.
    pub dispatch_latency: Histogram,
    /// Commits removed by pruning.
    pub pruned_commits: Counter,
    /// Pruning rounds run by this replica (having won the lock).
    pub prune_runs: Counter,
    /// Pruning rounds this replica skipped because another session held the pruning lock
    /// on `pgfeed.pruned`: normal now and then with several replicas; rising steadily, it
    /// means the journal is not being pruned.
    pub prune_skipped: Counter,
    /// Times the listener's arming barrier timed out (writers kept committing while it
    /// tried to go to sleep); it stayed awake and read instead.
    pub barrier_timeouts: Counter,
    /// Journal rows the listener skipped because this binary cannot decode them.
    pub malformed_changes: Counter,
    /// Open client connections (set at scrape time).
    pub connections: Gauge,
    /// Connections beyond `server.max_connections`: answered 503 `too_many_connections`
    /// (or, for `/healthz` and `/readyz`, answered and closed).
    pub connections_refused: Counter,
    /// Connections closed because their request head did not arrive within
    /// `server.header_timeout`.
    pub header_timeouts: Counter,
    /// Streams closed because their client accepted no bytes for `server.write_timeout`.
    pub write_timeouts: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh set of metrics, registered under the `pgfeed` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pgfeed");
        let m = Metrics {
            registry: Registry::default(),
            subscribers: Gauge::default(),
            tenant_channels: Gauge::default(),
            streams_opened: Counter::default(),
            streams_rejected: Family::default(),
            events: Family::default(),
            deliveries: Counter::default(),
            bytes_written: Counter::default(),
            lagged: Counter::default(),
            catchups: Counter::default(),
            journal_reads: Family::default(),
            resets: Counter::default(),
            listener_reconnects: Counter::default(),
            listener_ready: Gauge::default(),
            notification_queue_usage: Gauge::default(),
            // 50 µs .. ~1.6 s
            dispatch_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            pruned_commits: Counter::default(),
            prune_runs: Counter::default(),
            prune_skipped: Counter::default(),
            barrier_timeouts: Counter::default(),
            malformed_changes: Counter::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
            header_timeouts: Counter::default(),
            write_timeouts: Counter::default(),
        };
        registry.register("subscribers", "Open streams", m.subscribers.clone());
        registry.register(
            "tenant_channels",
            "Tenants with a live channel (those with open streams)",
            m.tenant_channels.clone(),
        );
        registry.register("streams_opened", "Streams opened", m.streams_opened.clone());
        registry.register(
            "streams_rejected",
            "Streams refused, by reason",
            m.streams_rejected.clone(),
        );
        registry.register(
            "events",
            "Changes received by the listener, by table and op",
            m.events.clone(),
        );
        registry.register(
            "deliveries",
            "Change frames written to subscribers",
            m.deliveries.clone(),
        );
        registry.register(
            "bytes_written",
            "Bytes written to streams",
            m.bytes_written.clone(),
        );
        registry.register(
            "lagged_subscribers",
            "Times a subscriber fell behind the live buffer",
            m.lagged.clone(),
        );
        registry.register(
            "catchups",
            "Lagged subscribers caught up (from memory or the journal) and live again",
            m.catchups.clone(),
        );
        registry.register(
            "journal_reads",
            "Journal reads, by kind",
            m.journal_reads.clone(),
        );
        registry.register(
            "resets",
            "reset events sent for pruned positions",
            m.resets.clone(),
        );
        registry.register(
            "listener_reconnects",
            "LISTEN connections lost and re-established",
            m.listener_reconnects.clone(),
        );
        registry.register(
            "listener_ready",
            "1 while the listener is connected and caught up",
            m.listener_ready.clone(),
        );
        registry.register(
            "notification_queue_usage",
            "pg_notification_queue_usage() at the last scrape",
            m.notification_queue_usage.clone(),
        );
        registry.register(
            "dispatch_latency_seconds",
            "Seconds from commit to publication to subscribers",
            m.dispatch_latency.clone(),
        );
        registry.register(
            "pruned_commits",
            "Commits removed from the journal by pruning",
            m.pruned_commits.clone(),
        );
        registry.register(
            "prune_runs",
            "Pruning rounds run by this replica",
            m.prune_runs.clone(),
        );
        registry.register(
            "barrier_timeouts",
            "Times the listener's arming barrier timed out and it stayed awake",
            m.barrier_timeouts.clone(),
        );
        registry.register(
            "prune_skipped",
            "Pruning rounds skipped because another session held the pruning lock",
            m.prune_skipped.clone(),
        );
        registry.register(
            "malformed_changes",
            "Journal rows skipped by the listener because this binary cannot decode them (each logged with its position)",
            m.malformed_changes.clone(),
        );
        registry.register(
            "connections",
            "Open client connections",
            m.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections beyond server.max_connections: answered 503 (or only /healthz and /readyz)",
            m.connections_refused.clone(),
        );
        registry.register(
            "header_timeouts",
            "Connections closed because the request head took longer than server.header_timeout",
            m.header_timeouts.clone(),
        );
        registry.register(
            "write_timeouts",
            "Streams closed because the client accepted no bytes for server.write_timeout",
            m.write_timeouts.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Sets `notification_queue_usage` from `pg_notification_queue_usage()`: one short
    /// query. On failure the gauge keeps its last value.
    pub async fn sample_notification_queue(&self, db: &Db) -> Result<(), QueryError> {
        let rows = db.query("SELECT pg_notification_queue_usage()").await?;
        if let Some(row) = rows.first() {
            let usage: f64 = decode(row, 0, "pg_notification_queue_usage()")?;
            self.notification_queue_usage.set(usage);
        }
        Ok(())
    }

    /// Counts a rejected stream.
    pub fn rejected(&self, reason: &str) {
        self.streams_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts a journal read.
    pub fn journal_read(&self, kind: &str) {
        self.journal_reads
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Counts a published batch: events by table and op, and commit-to-dispatch latency.
    pub fn published(&self, changes: &[std::sync::Arc<Change>]) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut counts: HashMap<(&str, &'static str), u64> = HashMap::new();
        for change in changes {
            *counts
                .entry((change.table.as_str(), change.op.as_str()))
                .or_default() += 1;
            self.dispatch_latency
                .observe((now - change.committed_epoch).max(0.0));
        }
        for ((table, op), n) in counts {
            self.events
                .get_or_create(&EventLabels {
                    table: table.to_string(),
                    op: op.to_string(),
                })
                .inc_by(n);
        }
    }
}
