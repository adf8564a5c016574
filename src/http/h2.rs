//! Serving a connection with hyper's HTTP/2: over TLS when ALPN chose `h2`, in cleartext
//! when `server.h2c` is set and the connection opens with the HTTP/2 preface (prior
//! knowledge). One connection carries up to [`H2_MAX_STREAMS`] requests at once, each
//! answered as over HTTP/1.1; a connection with no request open is closed once it has
//! idled for `server.header_timeout` (between that and twice that), as an HTTP/1.1
//! connection that sends no request is, so that idle connections cannot hold the
//! connection cap.
//!
//! A client can stop taking one stream's data while it keeps the connection alive (HTTP/2
//! flow control is per stream): hyper then holds the data the body last gave it and stops
//! polling the body, so nothing in the body could notice. The connection notices instead:
//! bodies hand data to hyper in pieces of at most [`PIECE`], and a body whose last piece
//! has not been taken (hyper has not polled it again) for `server.write_timeout` is ended
//! from the connection's side: the subscriber behind it is dropped and counted as over
//! HTTP/1.1 (`pgfeed_write_timeouts_total`), and the stream ends if the client ever takes
//! data again. A body that is waiting for something of its own (a change, a journal read,
//! its heartbeat) is never ended this way. hyper polls again once the stream's flow-control
//! window has room for more than h2 still buffers, so what is measured is the client giving
//! back window: one that reads but gives window back only after reading half of a large
//! one (browsers do) must still take that half within `server.write_timeout`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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

/// The most a body hands hyper at once: a client taking data slowly is seen taking it
/// (hyper polls the body again once it has sent what it holds).
const PIECE: usize = 16 * 1024;

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

    /// Ends the bodies whose last piece of data hyper has not taken for `stalled`;
    /// returns how many.
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
                let stalled = |slot: &Slot| {
                    slot.handed.load(Ordering::Acquire)
                        && now.saturating_sub(slot.polled.load(Ordering::Acquire)) >= limit
                };
                if !stalled(&slot) {
                    return true;
                }
                let mut held = slot.held.lock().unwrap_or_else(PoisonError::into_inner);
                // Looked at again under the lock: a poll may have come meanwhile.
                if !stalled(&slot) {
                    return true;
                }
                if let Some(held) = held.take() {
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
    /// Whether that poll handed hyper data (which the client has not taken since, as
    /// hyper has not polled again), rather than finding the body waiting on its own.
    handed: AtomicBool,
    held: Mutex<Option<Held>>,
}

/// What a [`Slot`] holds.
struct Held {
    body: Body,
    /// The rest of a data frame larger than [`PIECE`], handed out first.
    rest: Bytes,
    _open: Open,
}

/// A response body that keeps its request counted as open while it lives, and its polls
/// known to the connection.
struct Tracked {
    slot: Arc<Slot>,
    activity: Arc<Activity>,
}

impl Tracked {
    fn new(body: Body, open: Open, activity: &Arc<Activity>) -> Tracked {
        let slot = Arc::new(Slot {
            polled: AtomicU64::new(activity.now_ms()),
            handed: AtomicBool::new(false),
            held: Mutex::new(Some(Held {
                body,
                rest: Bytes::new(),
                _open: open,
            })),
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

/// At most [`PIECE`] of `data`, the rest left in it.
fn piece(data: &mut Bytes) -> Bytes {
    if data.len() > PIECE {
        data.split_to(PIECE)
    } else {
        std::mem::take(data)
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let mut guard = self
            .slot
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let poll = match guard.as_mut() {
            None => Poll::Ready(None),
            Some(held) if !held.rest.is_empty() => {
                Poll::Ready(Some(Ok(Frame::data(piece(&mut held.rest)))))
            }
            Some(held) => match Pin::new(&mut held.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(mut data) => {
                        let first = piece(&mut data);
                        held.rest = data;
                        Poll::Ready(Some(Ok(Frame::data(first))))
                    }
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
                other => other,
            },
        };
        // Noted before the lock is let go, so that `reap` (which looks again under it)
        // never ends a body that has just been polled.
        let handed = matches!(poll, Poll::Ready(Some(_)));
        self.slot
            .polled
            .store(self.activity.now_ms(), Ordering::Release);
        self.slot.handed.store(handed, Ordering::Release);
        drop(guard);
        poll
    }

    fn is_end_stream(&self) -> bool {
        let held = self
            .slot
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        held.as_ref()
            .is_none_or(|held| held.rest.is_empty() && held.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let held = self
            .slot
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match held.as_ref() {
            None => SizeHint::with_exact(0),
            Some(held) if held.rest.is_empty() => held.body.size_hint(),
            Some(held) => {
                let inner = held.body.size_hint();
                let rest = held.rest.len() as u64;
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(rest));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(rest));
                }
                hint
            }
        }
    }
}

/// When a stream whose client takes none of its data is ended (module docs).
pub(crate) struct Stalls {
    /// `server.write_timeout`.
    pub(crate) write_timeout: Duration,
    /// Where ended streams are counted (`write_timeouts`).
    pub(crate) metrics: Arc<Metrics>,
}

/// Serves one HTTP/2 connection, `handler` answering each stream's request, until it
/// closes, it has had no request open for `idle_timeout` (checked every `idle_timeout`),
/// or `shutdown`; then the client is told to open no more streams (GOAWAY) and the
/// connection ends when its open streams have (after an idle close, once none is open:
/// streams ended for a stalled client may never end on the wire). With `stalls`, streams
/// whose client takes none of their data are ended (module docs).
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
    // One timer for idleness, re-armed only when it fires: the stall checks below must not
    // restart it.
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    // Checked four times per limit, so a stalled stream is ended within 1.25 of it.
    let mut stall_check = tokio::time::interval(stalls.map_or(Duration::from_secs(3600), |s| {
        (s.write_timeout / 4).max(Duration::from_millis(1))
    }));
    stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let idled = loop {
        tokio::select! {
            result = connection.as_mut() => return result,
            _ = shutdown.cancelled() => break false,
            () = idle.as_mut() => {
                let now = activity.seen.load(Ordering::Acquire);
                if now == seen && activity.open.load(Ordering::Acquire) == 0 {
                    break true;
                }
                seen = now;
                idle.as_mut().reset(Instant::now() + idle_timeout);
            }
            _ = stall_check.tick(), if stalls.is_some() => {
                if let Some(stalls) = stalls {
                    reap(&activity, stalls);
                }
            }
        }
    };
    connection.as_mut().graceful_shutdown();
    if !idled {
        return connection.await;
    }
    // Closed for idleness: streams ended for a stalled client may never end on the wire,
    // so the connection ends once none is open any more, whatever hyper still holds. A
    // request that raced the GOAWAY is served to its end.
    idle.as_mut().reset(Instant::now() + idle_timeout);
    loop {
        tokio::select! {
            result = connection.as_mut() => return result,
            () = idle.as_mut() => {
                if activity.open.load(Ordering::Acquire) == 0 {
                    return Ok(());
                }
                idle.as_mut().reset(Instant::now() + idle_timeout);
            }
            _ = stall_check.tick(), if stalls.is_some() => {
                if let Some(stalls) = stalls {
                    reap(&activity, stalls);
                }
            }
        }
    }
}

/// Ends the streams whose client took none of their data for `stalls.write_timeout`,
/// counted and logged.
fn reap(activity: &Activity, stalls: &Stalls) {
    let ended = activity.reap(stalls.write_timeout);
    if ended > 0 {
        stalls.metrics.write_timeouts.inc_by(ended as u64);
        tracing::info!(
            streams = ended,
            write_timeout = %humantime::format_duration(stalls.write_timeout),
            "HTTP/2 stream closed: its client accepted no bytes within server.write_timeout"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use hyper::body::Body as _;
    use std::task::Waker;

    /// A body that hands out `data` (if any) and then waits for ever, as a stream does
    /// between changes or during a journal read.
    fn waits_after(data: Option<Bytes>) -> Body {
        let frames = futures_util::stream::iter(data.map(|d| Ok(Frame::data(d))));
        StreamBody::new(futures_util::StreamExt::chain(
            frames,
            futures_util::stream::pending(),
        ))
        .boxed_unsync()
    }

    fn poll(tracked: &mut Tracked) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(tracked).poll_frame(&mut cx)
    }

    fn data_len(poll: Poll<Option<Result<Frame<Bytes>, Infallible>>>) -> usize {
        match poll {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().expect("a data frame").len(),
            other => panic!("no data: {other:?}"),
        }
    }

    #[tokio::test]
    async fn only_a_body_whose_data_is_not_taken_is_ended_and_data_goes_in_pieces() {
        let activity = Arc::new(Activity::new());
        let mut waiting = Tracked::new(waits_after(None), Open::new(&activity), &activity);
        let mut handing = Tracked::new(
            waits_after(Some(Bytes::from(vec![b'x'; 40_000]))),
            Open::new(&activity),
            &activity,
        );
        let mut taken = Tracked::new(
            waits_after(Some(Bytes::from_static(b"small"))),
            Open::new(&activity),
            &activity,
        );
        assert!(poll(&mut waiting).is_pending());
        assert_eq!(data_len(poll(&mut handing)), PIECE);
        assert_eq!(data_len(poll(&mut taken)), 5);
        // hyper took the small piece and asked for more: the body waits on its own.
        assert!(poll(&mut taken).is_pending());
        assert_eq!(activity.open.load(Ordering::Acquire), 3);

        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(activity.reap(Duration::from_millis(100)), 1);
        assert_eq!(activity.open.load(Ordering::Acquire), 2);
        // The ended body ends its stream, and holds nothing more.
        assert!(matches!(poll(&mut handing), Poll::Ready(None)));
        assert!(handing.is_end_stream());
        // The others are left alone, however long they wait.
        assert!(poll(&mut waiting).is_pending());
        assert!(poll(&mut taken).is_pending());
        assert_eq!(activity.reap(Duration::from_millis(100)), 0);
    }

    /// A client that stops reading its only stream: the stream is ended, the connection
    /// goes idle, and it ends within a few idle timeouts although hyper never finishes
    /// the stream on the wire.
    #[tokio::test]
    async fn a_connection_whose_only_stream_stalled_ends_when_idle() {
        use http_body_util::Empty;
        use hyper_util::rt::TokioExecutor;
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let metrics = Arc::new(Metrics::new());
        let stalls = Stalls {
            write_timeout: Duration::from_millis(200),
            metrics: Arc::clone(&metrics),
        };
        // An endless stream: 1 KiB every 10 ms.
        let handler = |_req: Request<Incoming>| async {
            let frames = futures_util::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Some((Ok(Frame::data(Bytes::from(vec![b'z'; 1024]))), ()))
            });
            Response::new(StreamBody::new(frames).boxed_unsync())
        };
        let server = tokio::spawn(async move {
            let shutdown = CancellationToken::new();
            serve_connection_h2(
                server_io,
                handler,
                Duration::from_millis(500),
                Some(&stalls),
                &shutdown,
            )
            .await
        });
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(4096)
            .handshake(TokioIo::new(client_io))
            .await
            .unwrap();
        tokio::spawn(conn);
        send.ready().await.unwrap();
        let request = Request::get("http://localhost/")
            .body(Empty::<Bytes>::new())
            .unwrap();
        // Never read.
        let _response = send.send_request(request).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), server).await;
        assert!(ended.is_ok(), "the connection stayed open");
        assert_eq!(metrics.write_timeouts.get(), 1);
    }

    #[tokio::test]
    async fn a_large_frame_is_handed_out_whole_in_pieces() {
        let activity = Arc::new(Activity::new());
        let mut body = Tracked::new(
            waits_after(Some(Bytes::from(vec![b'y'; 2 * PIECE + 10]))),
            Open::new(&activity),
            &activity,
        );
        let sizes: Vec<usize> = (0..3).map(|_| data_len(poll(&mut body))).collect();
        assert_eq!(sizes, vec![PIECE, PIECE, 10]);
        assert!(poll(&mut body).is_pending());
    }
}
