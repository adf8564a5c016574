//! The benchmark's streams: N subscribers (and any stalled ones) over T tenants, each a
//! task on a raw socket with a real token, reading with a buffer shared per worker thread
//! (an idle stream holds none) and timing each change at receipt. [`Streams`] opens them,
//! waits until they are live, waits for the deliveries, and collects what each received.

use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::SECRET;
use crate::cli::Params;
use crate::measure::now_us;
use crate::received::Reader;

/// What every subscriber task shares.
pub(crate) struct SubShared {
    /// Streams that received `event: live`.
    pub(crate) live: AtomicUsize,
    /// Streams that could not be opened.
    pub(crate) failed: AtomicUsize,
    /// Change events received, in all.
    pub(crate) delivered: AtomicU64,
    /// Receipt time of the newest change event (µs since the epoch).
    pub(crate) last_recv_us: AtomicU64,
    /// First sequence number of this run's rows.
    pub(crate) base: i64,
    /// Rows are spread over this many tenants.
    pub(crate) write_tenants: u64,
    /// First refusal or error, for the report.
    pub(crate) first_error: Mutex<Option<String>>,
}

/// What one stream received.
#[derive(Default)]
pub(crate) struct SubResult {
    pub(crate) tenant: u32,
    pub(crate) live: bool,
    pub(crate) failed: bool,
    /// The server ended the stream before the benchmark stopped it.
    pub(crate) ended: bool,
    /// Sequence numbers received (relative to the run's base).
    pub(crate) seqs: Vec<u32>,
    /// Latency of each, in µs.
    pub(crate) lat_us: Vec<u32>,
    /// Events whose tenant is not the subscriber's.
    pub(crate) leaks: u64,
    /// Events whose position is not after the previous one.
    pub(crate) out_of_order: u64,
    /// Change events that could not be parsed.
    pub(crate) malformed: u64,
    /// Control events other than `live` (shutdown, expired, reset).
    pub(crate) other_control: u64,
    /// Change events received, well-formed or not: with `change_bytes`, the mean size of
    /// a change frame, which sizes the write floor's frame.
    pub(crate) change_frames: u64,
    /// Bytes of those change events as SSE text (`id:`, `event:`, `data:` lines and the
    /// blank line; chunked encoding removed).
    pub(crate) change_bytes: u64,
}

thread_local! {
    /// Read buffer shared by the subscriber tasks of a worker thread: a stream holds no
    /// buffer of its own while idle.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 64 * 1024]);
}

/// One stream to open.
pub(crate) struct SubSpec {
    pub(crate) addr: SocketAddr,
    pub(crate) source: Ipv4Addr,
    pub(crate) tenant: u32,
    pub(crate) tenant_name: Arc<str>,
    pub(crate) token: Arc<str>,
    /// Stop reading once live.
    pub(crate) stall: bool,
}

/// One stream: waits for a handshake slot of `gate`, connects from `spec.source`, reads
/// until `stop` (or, stalled, stops reading once live), and returns what it received.
pub(crate) async fn subscriber(
    spec: SubSpec,
    shared: Arc<SubShared>,
    gate: Arc<Semaphore>,
    stop: CancellationToken,
) -> SubResult {
    let mut res = SubResult {
        tenant: spec.tenant,
        ..SubResult::default()
    };
    let fail = |res: &mut SubResult, why: String| {
        res.failed = true;
        shared.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = shared.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(why);
    };
    let mut permit: Option<OwnedSemaphorePermit> = match gate.acquire_owned().await {
        Ok(p) => Some(p),
        Err(_) => return res,
    };
    let connect = async {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(spec.source.into(), 0))?;
        let stream = socket.connect(spec.addr).await?;
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(stream)
    };
    let mut stream = match tokio::time::timeout(Duration::from_secs(60), connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            fail(&mut res, format!("connect: {e}"));
            return res;
        }
        Err(_) => {
            fail(&mut res, "connect timed out".into());
            return res;
        }
    };
    let auth = format!("Bearer {}", spec.token);
    let request = pgfeed_testkit::wire::request_head(
        "GET",
        "/v1/stream",
        spec.addr,
        &[("Accept", "text/event-stream"), ("Authorization", &auth)],
    );
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        fail(&mut res, format!("sending the request: {e}"));
        return res;
    }
    let mut reader = Reader::new(spec.tenant_name);
    // One cancellation future for the stream's life: a new one per read registered and
    // removed a waiter on the token all streams share, under its lock.
    let mut stopped = std::pin::pin!(stop.cancelled());
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            ready = stream.readable() => if let Err(e) = ready {
                fail(&mut res, format!("reading: {e}"));
                break;
            }
        }
        let read = SCRATCH.with(|scratch| {
            let mut buf = scratch.borrow_mut();
            match stream.try_read(&mut buf) {
                Ok(0) => Ok(None),
                Ok(n) => {
                    let now = now_us();
                    let changes = reader.feed(&buf[..n], now, &mut res, &shared)?;
                    Ok(Some((changes, now)))
                }
                Err(e) => Err(e),
            }
        });
        match read {
            Ok(Some((changes, now))) => {
                if changes > 0 {
                    shared.delivered.fetch_add(changes, Ordering::Relaxed);
                    shared.last_recv_us.fetch_max(now, Ordering::Relaxed);
                }
                if let Some(status) = reader.status()
                    && status != 200
                {
                    let body = String::from_utf8_lossy(reader.parser.unread()).into_owned();
                    fail(&mut res, format!("HTTP {status}: {body}"));
                    break;
                }
                if res.live && permit.is_some() {
                    permit = None;
                    shared.live.fetch_add(1, Ordering::Relaxed);
                    if spec.stall {
                        // A client that stops reading: hold the socket, read nothing.
                        stopped.as_mut().await;
                        break;
                    }
                }
            }
            Ok(None) => {
                res.ended = true;
                if !res.live {
                    fail(&mut res, "the stream closed before `live`".into());
                }
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                fail(&mut res, format!("reading: {e}"));
                break;
            }
        }
    }
    drop(permit);
    res
}

/// The run's streams: their tasks and what they share.
pub(crate) struct Streams {
    pub(crate) shared: Arc<SubShared>,
    stop: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<SubResult>>,
    /// Streams that are not stalled (the first ones).
    subscribers: usize,
    /// Streams live once opening ended.
    pub(crate) live: usize,
    /// Seconds from the first handshake until all streams were live or failed.
    pub(crate) connect_s: f64,
}

impl Streams {
    /// Opens `p.subscribers` streams and `p.stalled` stalled ones, subscriber i of tenant
    /// `t{i % tenants}`, at most `concurrency` handshakes at once, and waits until all are
    /// live or failed, or until the deadline. `base` is the run's first sequence number.
    pub(crate) async fn open(
        p: &Params,
        concurrency: usize,
        addr: SocketAddr,
        base: i64,
        run: usize,
    ) -> Result<Streams> {
        let auth = pgfeed::config::AuthConfig::hs256(SECRET);
        let mut tokens = Vec::with_capacity(p.tenants);
        for t in 0..p.tenants {
            let name: Arc<str> = Arc::from(format!("t{t}"));
            let token = pgfeed::auth::mint(&auth, &name, None, Duration::from_secs(4 * 3600))?;
            tokens.push((name, Arc::<str>::from(token)));
        }
        let shared = Arc::new(SubShared {
            live: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
            last_recv_us: AtomicU64::new(0),
            base,
            write_tenants: p.write_tenants as u64,
            first_error: Mutex::new(None),
        });
        let stop = CancellationToken::new();
        let gate = Arc::new(Semaphore::new(concurrency.max(1)));
        eprintln!("run {}: opening {} streams", run + 1, p.subscribers);
        let t_connect = Instant::now();
        let total_streams = p.subscribers + p.stalled;
        let mut handles = Vec::with_capacity(total_streams);
        for i in 0..total_streams {
            let t = i % p.tenants;
            let spec = SubSpec {
                addr,
                source: Ipv4Addr::new(127, 0, 0, 1 + (i % p.source_addrs) as u8),
                tenant: t as u32,
                tenant_name: Arc::clone(&tokens[t].0),
                token: Arc::clone(&tokens[t].1),
                stall: i >= p.subscribers,
            };
            handles.push(tokio::spawn(subscriber(
                spec,
                Arc::clone(&shared),
                Arc::clone(&gate),
                stop.clone(),
            )));
        }
        let open_deadline = Instant::now() + Duration::from_secs(120 + p.subscribers as u64 / 200);
        loop {
            let done = shared.live.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed);
            if done >= total_streams {
                break;
            }
            if Instant::now() > open_deadline {
                eprintln!(
                    "run {}: only {done} of {total_streams} streams opened in time",
                    run + 1
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let live = shared.live.load(Ordering::Relaxed);
        Ok(Streams {
            shared,
            stop,
            handles,
            subscribers: p.subscribers,
            live,
            connect_s: t_connect.elapsed().as_secs_f64(),
        })
    }

    /// Waits for the outstanding deliveries, giving up after `timeout_s` without progress,
    /// then a little longer, so that duplicates and leaks have a chance to show.
    pub(crate) async fn drain(&self, expected: u64, timeout_s: f64, run: usize) {
        let mut last_seen = self.shared.delivered.load(Ordering::Relaxed);
        let mut last_progress = Instant::now();
        loop {
            let now = self.shared.delivered.load(Ordering::Relaxed);
            if now >= expected {
                break;
            }
            if now != last_seen {
                last_seen = now;
                last_progress = Instant::now();
            } else if last_progress.elapsed().as_secs_f64() > timeout_s {
                eprintln!(
                    "run {}: gave up waiting: {now} of {expected} deliveries",
                    run + 1
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// Stops every stream: (the subscribers' results, the stalled streams' results).
    pub(crate) async fn finish(self) -> Result<(Vec<SubResult>, Vec<SubResult>)> {
        self.stop.cancel();
        let mut results = Vec::with_capacity(self.handles.len());
        for h in self.handles {
            results.push(h.await?);
        }
        let stalled = results.split_off(self.subscribers);
        Ok((results, stalled))
    }
}

impl SubShared {
    /// The first refusal or error any stream met, taken.
    pub(crate) fn take_first_error(&self) -> Option<String> {
        self.first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}
