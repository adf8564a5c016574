//! Serving a connection with hyper's HTTP/2: over TLS when ALPN chose `h2`, in cleartext
//! when `server.h2c` is set and the connection opens with the HTTP/2 preface (prior
//! knowledge). One connection carries up to [`H2_MAX_STREAMS`] requests at once, each
//! answered as over HTTP/1.1; a connection with no request open is closed once it has
//! idled for `server.header_timeout` (between that and twice that), as an HTTP/1.1
//! connection that sends no request is, so that idle connections cannot hold the
//! connection cap.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
use tokio_util::sync::CancellationToken;

use super::limits::MAX_BUFFER;
use super::response::Body;

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

/// Requests open on a connection, and how many it has had.
#[derive(Default)]
struct Activity {
    open: AtomicUsize,
    seen: AtomicU64,
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

/// A response body that keeps its request counted as open while it lives.
struct Tracked {
    body: Body,
    _open: Open,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves one HTTP/2 connection, `handler` answering each stream's request, until it
/// closes, it has had no request open for `idle_timeout` (checked every `idle_timeout`),
/// or `shutdown`; then the client is told to open no more streams (GOAWAY) and the
/// connection ends when its open streams have.
pub(crate) async fn serve_connection_h2<T, F, Fut>(
    io: T,
    handler: F,
    idle_timeout: Duration,
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
    let activity = Arc::new(Activity::default());
    let service = {
        let activity = Arc::clone(&activity);
        service_fn(move |req| {
            let open = Open::new(&activity);
            // A combinator rather than an async block: a block that awaits a future it
            // captured holds it twice (rust-lang/rust#62958), ~0.9 KiB per stream here.
            handler(req).map(move |response| {
                Ok::<_, Infallible>(
                    response.map(|body| Tracked { body, _open: open }.boxed_unsync()),
                )
            })
        })
    };
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut seen = activity.seen.load(Ordering::Acquire);
    loop {
        tokio::select! {
            result = connection.as_mut() => return result,
            _ = shutdown.cancelled() => break,
            () = tokio::time::sleep(idle_timeout) => {
                let now = activity.seen.load(Ordering::Acquire);
                if now == seen && activity.open.load(Ordering::Acquire) == 0 {
                    break;
                }
                seen = now;
            }
        }
    }
    connection.as_mut().graceful_shutdown();
    connection.await
}
