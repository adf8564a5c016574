//! Serving a connection with hyper's HTTP/2: over TLS when ALPN chose `h2`, in cleartext
//! when `server.h2c` is set and the connection opens with the HTTP/2 preface (prior
//! knowledge). One connection carries up to [`H2_MAX_STREAMS`] requests at once, each
//! answered as over HTTP/1.1; a connection with no request open is closed once it has
//! idled for `server.header_timeout` (between that and twice that), as an HTTP/1.1
//! connection that sends no request is, so that idle connections cannot hold the
//! connection cap.
//!
//! A client can stop taking one stream's data while it keeps the connection alive (HTTP/2
//! flow control is per stream): hyper then stops polling that stream's body, so nothing
//! in the body could notice. A body that has not been polled for `server.write_timeout`
//! plus one `server.heartbeat` (a live stream has something to send at least once per
//! heartbeat) is ended from the connection's side instead: the subscriber behind it is
//! dropped and counted as over HTTP/1.1 (`pgfeed_write_timeouts_total`), and the stream
//! ends if the client ever takes data again.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::limits::MAX_BUFFER;
use super::response::Body;
use crate::metrics::Metrics;

/// Streams one HTTP/2 connection multiplexes at most.
pub(crate) const H2_MAX_STREAMS: u32 = 256;

/// What a client speaking HTTP/2 with prior knowledge sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a connection's first bytes are (the start of) the HTTP/2 preface: enough of it
/// to tell it from an HTTP/1 request line.
pub(crate) fn is_h2_preface(prefix: &[u8]) -> bool {
    let n = prefix.len().min(H2_PREFACE.len());
    n >= b"PRI * HTTP/2".len() && prefix[..n] == H2_PREFACE[..n]
}

/// Requests open on a connection, how many it has had, and their responses' bodies.
struct Activity {
    open: AtomicUsize,
    seen: AtomicU64,
    /// When the connection began: bodies' last polls are counted from it.
    began: Instant,
    slots: Mutex<Vec<Weak<Slot>>>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            open: AtomicUsize::new(0),
            seen: AtomicU64::new(0),
            began: Instant::now(),
            slots: Mutex::new(Vec::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.began.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Ends the bodies not polled for `stalled`; returns how many.
    fn reap(&self, stalled: Duration) -> usize {
        let now = self.now_ms();
        let limit = u64::try_from(stalled.as_millis()).unwrap_or(u64::MAX);
        let mut ended = Vec::new();
        {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            slots.retain(|weak| {
                let Some(slot) = weak.upgrade() else {
                    return false;
                };
                if now.saturating_sub(slot.polled.load(Ordering::Acquire)) < limit {
                    return true;
                }
                if let Some(held) = slot
                    .held
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take()
                {
                    ended.push(held);
                }
                false
            });
        }
        // Dropped outside the lock: ending a subscriber does work of its own.
        ended.len()
    }
}

/// One open request; dropping it (with the response's body, or the request's future when
/// the client resets it first) closes it.
struct Open(Arc<Activity>);

impl Open {
    fn new(activity: &Arc<Activity>) -> Open {
        activity.open.fetch_add(1, Ordering::AcqRel);
        activity.seen.fetch_add(1, Ordering::AcqRel);
        Open(Arc::clone(activity))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response's body and its request's count as open, until the body ends or the
/// connection ends it for a client that stopped taking its data ([`Activity::reap`]).
struct Slot {
    /// [`Activity::now_ms`] at the body's last poll.
    polled: AtomicU64,
    held: Mutex<Option<(Body, Open)>>,
}

/// A response body that keeps its request counted as open while it lives, and its last
/// poll known to the connection.
struct Tracked {
    slot: Arc<Slot>,
    activity: Arc<Activity>,
}

impl Tracked {
    fn new(body: Body, open: Open, activity: &Arc<Activity>) -> Tracked {
        let slot = Arc::new(Slot {
            polled: AtomicU64::new(activity.now_ms()),
            held: Mutex::new(Some((body, open))),
        });
        let mut slots = activity
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Bounded between checks however many short requests come: at most this many
        // streams are open at once.
        if slots.len() >= 2 * H2_MAX_STREAMS as usize {
            slots.retain(|weak| weak.strong_count() > 0);
        }
        slots.push(Arc::downgrade(&slot));
        drop(slots);
        Tracked {
            slot,
            activity: Arc::clone(activity),
        }
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.slot
            .polled
            .store(self.activity.now_ms(), Ordering::Release);
        let mut held = self
            .slot
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match held.as_mut() {
            Some((body, _)) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        let held = self
            .slot
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        held.as_ref().is_none_or(|(body, _)| body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let held = self
            .slot
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        held.as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |(body, _)| body.size_hint())
    }
}

/// When a stream whose client takes none of its data is ended (module docs).
pub(crate) struct Stalls {
    /// `server.write_timeout`.
    pub(crate) write_timeout: Duration,
    /// `server.heartbeat`.
    pub(crate) heartbeat: Duration,
    /// Where ended streams are counted (`write_timeouts`).
    pub(crate) metrics: Arc<Metrics>,
}

/// Serves one HTTP/2 connection, `handler` answering each stream's request, until it
/// closes, it has had no request open for `idle_timeout` (checked every `idle_timeout`),
/// or `shutdown`; then the client is told to open no more streams (GOAWAY) and the
/// connection ends when its open streams have (after an idle close, within
/// `idle_timeout`: streams ended for a stalled client may never end on the wire). With
/// `stalls`, bodies not polled for long are ended (module docs).
pub(crate) async fn serve_connection_h2<T, F, Fut>(
    io: T,
    handler: F,
    idle_timeout: Duration,
    stalls: Option<&Stalls>,
    shutdown: &CancellationToken,
) -> Result<(), hyper::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(MAX_BUFFER as u32);
    let activity = Arc::new(Activity::new());
    let service = {
        let activity = Arc::clone(&activity);
        service_fn(move |req| {
            let open = Open::new(&activity);
            let activity = Arc::clone(&activity);
            // A combinator rather than an async block: a block that awaits a future it
            // captured holds it twice (rust-lang/rust#62958), ~0.9 KiB per stream here.
            handler(req).map(move |response| {
                Ok::<_, Infallible>(
                    response.map(|body| Tracked::new(body, open, &activity).boxed_unsync()),
                )
            })
        })
    };
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut seen = activity.seen.load(Ordering::Acquire);
    // Checked four times per limit, so a stalled stream is ended within 1.25 of it.
    let stalled = stalls.map(|s| s.write_timeout + s.heartbeat);
    let mut stall_check =
        tokio::time::interval(stalled.map_or(Duration::from_secs(3600), |d| d / 4));
    stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let idled = loop {
        tokio::select! {
            result = connection.as_mut() => return result,
            _ = shutdown.cancelled() => break false,
            () = tokio::time::sleep(idle_timeout) => {
                let now = activity.seen.load(Ordering::Acquire);
                if now == seen && activity.open.load(Ordering::Acquire) == 0 {
                    break true;
                }
                seen = now;
            }
            _ = stall_check.tick(), if stalled.is_some() => {
                if let (Some(limit), Some(stalls)) = (stalled, stalls) {
                    let ended = activity.reap(limit);
                    if ended > 0 {
                        stalls.metrics.write_timeouts.inc_by(ended as u64);
                        tracing::info!(
                            streams = ended,
                            write_timeout = %humantime::format_duration(stalls.write_timeout),
                            "HTTP/2 stream closed: its client accepted no bytes within server.write_timeout"
                        );
                    }
                }
            }
        }
    };
    connection.as_mut().graceful_shutdown();
    if idled {
        return match tokio::time::timeout(idle_timeout, connection).await {
            Ok(result) => result,
            Err(_) => Ok(()),
        };
    }
    connection.await
}
