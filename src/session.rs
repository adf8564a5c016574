//! One subscriber's session, as a state machine: replay from the journal (when the client
//! resumes), the `live` marker, live changes from the hub (with catch-ups when it falls
//! behind), heartbeats, and the end (shutdown, token expiry, `reset` when its position is
//! gone).
//!
//! The session is pulled ([`EventStream::next_chunk`]) only when the socket can take more,
//! so a client that stops reading costs little memory: live, nothing beyond its hub
//! receiver (it falls behind, gets `Lagged`, and is caught up when it reads again: from
//! the hub's memory of recent changes while that reaches back far enough, else from the
//! journal); in a replay or catch-up, one journal read (bounded in real bytes,
//! [`crate::journal::STREAM_READ_BYTES`]) and the chunk being written. Duplicates at the
//! replay/live seam are dropped by position. Frames that are ready are written together,
//! up to [`MAX_CHUNK`] per chunk (or one frame, if larger). This module never decides who
//! may see what beyond applying the subscriber's [`Selection`], never encodes a frame
//! itself ([`crate::frame`]) and never touches a socket or HTTP ([`crate::http`] and
//! [`crate::rawconn`] write what it yields).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt as _;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::change::{Change, Position};
use crate::filter::Selection;
use crate::frame::{self, Chunk, Control, Format};
use crate::hub::Subscription;
use crate::journal::{Batch, Journal, Scope};
use crate::metrics::Metrics;

/// Most bytes gathered into one chunk before it is handed to the socket.
const MAX_CHUNK: usize = 256 * 1024;

/// Settings every stream shares.
#[derive(Clone, Debug)]
pub struct StreamSettings {
    /// Interval of `: keepalive` comments.
    pub heartbeat: Duration,
    /// Reconnect delay announced with `retry:`.
    pub retry: Duration,
}

impl From<&crate::config::ServerConfig> for StreamSettings {
    /// `server.heartbeat` and `server.retry`.
    fn from(server: &crate::config::ServerConfig) -> Self {
        StreamSettings {
            heartbeat: server.heartbeat,
            retry: server.retry,
        }
    }
}

/// What a stream is made of, for [`EventStream::new`].
pub struct StreamParts<'a> {
    /// For replay and catch-up.
    pub journal: Journal,
    /// The subscriber's place in the hub, registered before the response starts.
    pub subscription: Subscription,
    /// What the subscriber receives.
    pub selection: Selection,
    /// SSE or NDJSON.
    pub format: Format,
    /// Where the client resumes (`Last-Event-ID`), or `None` to start live.
    pub resume_from: Option<Position>,
    /// When the subscriber's token expires, if it does.
    pub expires_at: Option<SystemTime>,
    /// Heartbeat and retry, shared by every stream.
    pub settings: &'a StreamSettings,
    /// The stream's own token, cancelled on shutdown: a child of the server's, since every
    /// poll of a cancellation future locks its token's node.
    pub shutdown: CancellationToken,
    /// Where deliveries, lag and catch-ups are counted.
    pub metrics: Arc<Metrics>,
}

/// Most changes taken from the hub's memory for one chunk of a catch-up or replay.
const RECENT_BATCH: usize = 1024;

/// `reset` reason: the position is older than the journal keeps.
const PRUNED: &str = "the requested position is older than the journal keeps; refetch your state, then continue from `position`";

/// `reset` reason: a database crash took back the numbering that gave out the position.
const CRASHED: &str = "the database crashed and the position was given out by a numbering it lost (the same changes have other positions now); refetch your state, then continue from `position`";

/// `reset` reason: the journal was recreated, or a crash took back the newest numbering
/// ([`crate::hub::Hub::restart`]).
const REINSTALLED: &str = "the journal's positions started over (pgfeed was reinstalled, or the database crashed and lost the numbering of the newest changes); refetch your state, then continue from `position`";

/// What a journal read for a replay or catch-up came to.
enum Read {
    /// Changes after the stream's position.
    Batch(Batch),
    /// The position is not in the journal: older than it keeps, or lost in a crash (the
    /// reason).
    Reset(&'static str),
    /// The stream ends, with this last frame if any.
    End(Option<Bytes>),
}

/// Where the stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Reading the journal after `last`; `announce` sends `live` when it reaches the end.
    Replay { announce: bool },
    /// Forwarding the hub's changes.
    Live,
    /// The journal was recreated (pgfeed reinstalled): `reset` is due.
    Restarted,
}

/// One subscriber's stream state.
pub struct EventStream {
    /// For replay and catch-up.
    journal: Journal,
    /// Live changes of the tenant, and the stream's counted place in the hub.
    subscription: Subscription,
    /// Where deliveries, lag and catch-ups are counted.
    metrics: Arc<Metrics>,
    /// When the stream opened, for the close log line.
    opened: std::time::Instant,
    /// Change frames written so far.
    delivered: u64,
    /// Change frames in the chunk being built, not yet counted in `metrics`.
    pending: u64,
    /// What the subscriber receives.
    selection: Selection,
    /// SSE or NDJSON.
    format: Format,
    /// Position of the last change handled (delivered or filtered out); anything at or
    /// before it is a duplicate.
    last: Position,
    /// Replay or live.
    mode: Mode,
    /// Changes of the current replay or catch-up read not written yet: a read is written
    /// [`MAX_CHUNK`] at a time, so a client that stops reading holds at most one read
    /// (bounded in real bytes, `journal::STREAM_READ_BYTES`) and one chunk.
    unwritten: VecDeque<Arc<Change>>,
    /// Whether more follows the current read (its `more`), and the position its last row
    /// had (its `end`), applied once `unwritten` is written.
    unwritten_more: bool,
    unwritten_end: Option<Position>,
    /// One timer for both the next heartbeat and the token's expiry, whichever is
    /// first. It and `shutdown` live as long as the stream: creating them anew for every
    /// wait registered and removed a timer entry and a waiter per delivery, under locks
    /// the runtime's threads share.
    timer: Pin<Box<Sleep>>,
    /// Interval of heartbeats.
    heartbeat: Duration,
    /// Reconnect delay for the first frame.
    retry: Duration,
    /// Completes when the server shuts down.
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// When the subscriber's token expires.
    expires: Option<Instant>,
    /// Whether the first frame (`retry:`) went out.
    started: bool,
    /// Whether the stream has ended.
    done: bool,
}

impl EventStream {
    /// A stream for a registered subscription. With `resume_from`, it replays the
    /// journal after that position first; without, it is live at once.
    pub fn new(parts: StreamParts<'_>) -> EventStream {
        let StreamParts {
            journal,
            subscription,
            selection,
            format,
            resume_from,
            expires_at,
            settings,
            shutdown,
            metrics,
        } = parts;
        let (last, mode) = match resume_from {
            Some(p) => (p, Mode::Replay { announce: true }),
            None => (subscription.from, Mode::Live),
        };
        // Far-off expiries (a token with `exp` 1e19) are no expiry, never an overflow.
        let expires = expires_at.and_then(|at| {
            let left = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            Instant::now().checked_add(left)
        });
        let timer = Box::pin(tokio::time::sleep_until(next_timer(
            Instant::now() + settings.heartbeat,
            expires,
        )));
        metrics.streams_opened.inc();
        tracing::info!(
            tenant = %crate::logging::Untrusted(&selection.tenant),
            format = ?format,
            resume = resume_from.map(tracing::field::display),
            "stream opened"
        );
        EventStream {
            journal,
            subscription,
            metrics,
            opened: std::time::Instant::now(),
            delivered: 0,
            pending: 0,
            selection,
            format,
            last,
            mode,
            unwritten: VecDeque::new(),
            unwritten_more: false,
            unwritten_end: None,
            timer,
            heartbeat: settings.heartbeat,
            retry: settings.retry,
            shutdown: Box::pin(shutdown.cancelled_owned()),
            expires,
            started: false,
            done: false,
        }
    }

    /// Completes when the stream must end whatever its client does: the server shuts
    /// down or the token expires. For a write that is blocked on a client that stopped
    /// reading (the stream's own checks only run between writes).
    pub(crate) async fn interrupted(&mut self) {
        let expires = self.expires;
        let expiry = async move {
            match expires {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut self.shutdown => {}
            () = expiry => {}
        }
    }

    fn live_frame(&self) -> Bytes {
        frame::control(self.format, Control::Live, self.last)
    }

    /// Appends `change` if it is new and selected; a change at or before `last` is a
    /// duplicate from the replay/live seam and is dropped.
    fn take(&mut self, change: &Change, chunk: &mut Chunk) {
        if change.position <= self.last {
            return;
        }
        self.last = change.position;
        if self.selection.matches(change) {
            chunk.push(change.frame(self.format, self.selection.payload));
            self.pending += 1;
        }
    }

    /// The next chunk to write, or `None` when the stream ends.
    pub async fn next_chunk(&mut self) -> Option<Bytes> {
        let chunk = self.produce().await;
        if let Some(chunk) = &chunk {
            self.metrics.bytes_written.inc_by(chunk.len() as u64);
        }
        if self.pending > 0 {
            self.metrics.deliveries.inc_by(self.pending);
            self.delivered += self.pending;
            self.pending = 0;
        }
        chunk
    }

    async fn produce(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        if !self.started {
            self.started = true;
            let mut buf = BytesMut::new();
            if let Some(retry) = frame::retry(self.format, self.retry) {
                buf.extend_from_slice(&retry);
            }
            if self.mode == Mode::Live {
                buf.extend_from_slice(&self.live_frame());
            }
            if !buf.is_empty() {
                return Some(buf.freeze());
            }
        }
        loop {
            match self.mode {
                Mode::Replay { announce } => {
                    if self.unwritten.is_empty() {
                        // A catch-up (not a client's resume, which the journal answers, with
                        // `reset` when the position is older than it keeps) is served from
                        // the hub's memory while that still holds everything after `last`.
                        let recent = match announce {
                            true => None,
                            false => {
                                // Nothing here waits, so shutdown and expiry are checked by
                                // hand: a client reading just fast enough to stay in
                                // catch-up must not outlive its token or the server.
                                if (&mut self.shutdown).now_or_never().is_some() {
                                    return self.finish_shutdown();
                                }
                                if self.expires.is_some_and(|at| at <= Instant::now()) {
                                    return self.finish_expired();
                                }
                                self.subscription
                                    .recent_after(self.last, RECENT_BATCH, MAX_CHUNK)
                            }
                        };
                        let (changes, more, end) = match recent {
                            Some((changes, more)) => (changes, more, None),
                            None => match self.read_journal(announce).await {
                                Read::Batch(batch) => {
                                    for skipped in &batch.skipped {
                                        // The listener logs and counts each; a replay only
                                        // passes over it.
                                        tracing::debug!(position = %skipped.position, reason = %skipped.reason, "replay skips a journal row this gateway cannot decode");
                                    }
                                    (batch.changes, batch.more, batch.end)
                                }
                                Read::Reset(reason) => return self.reset(reason).await,
                                Read::End(frame) => return frame,
                            },
                        };
                        self.unwritten = changes.into();
                        self.unwritten_more = more;
                        self.unwritten_end = end;
                    }
                    let mut chunk = Chunk::default();
                    while chunk.len() < MAX_CHUNK
                        && let Some(change) = self.unwritten.pop_front()
                    {
                        self.take(&change, &mut chunk);
                    }
                    if self.unwritten.is_empty() {
                        // Past skipped rows too, so that the next read does not return them.
                        if let Some(end) = self.unwritten_end.take() {
                            self.last = self.last.max(end);
                        }
                        if !self.unwritten_more {
                            self.mode = Mode::Live;
                            if announce {
                                chunk.push(&self.live_frame());
                            } else {
                                self.metrics.catchups.inc();
                            }
                        }
                    }
                    if let Some(bytes) = chunk.finish() {
                        return Some(bytes);
                    }
                }
                Mode::Live => {
                    let received = tokio::select! {
                        biased;
                        _ = &mut self.shutdown => return self.finish_shutdown(),
                        _ = &mut self.timer => return self.on_timer(),
                        received = self.subscription.receiver.recv() => received,
                    };
                    match received {
                        Ok(change) => {
                            let mut chunk = Chunk::default();
                            self.take(&change, &mut chunk);
                            self.drain(&mut chunk);
                            if let Some(bytes) = chunk.finish() {
                                return Some(bytes);
                            }
                        }
                        Err(RecvError::Lagged(missed)) => self.lagged(missed),
                        Err(RecvError::Closed) => self.gap(),
                    }
                }
                Mode::Restarted => return self.reset(REINSTALLED).await,
            }
        }
    }

    /// Reads the journal after `last` for a replay or catch-up, ending the stream on
    /// shutdown, expiry or a failed read. A heartbeat would interrupt the read, and replay
    /// sends data anyway: only the expiry counts here.
    async fn read_journal(&mut self, announce: bool) -> Read {
        let expires = self.expires;
        let expiry = async move {
            match expires {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let read = tokio::select! {
            biased;
            _ = &mut self.shutdown => return Read::End(self.finish_shutdown()),
            _ = expiry => return Read::End(self.finish_expired()),
            // Boxed: the read's state lives on the heap only while it runs, instead of
            // enlarging every stream's state machine.
            read = Box::pin(self.journal.read_after(self.last, Scope::Tenant(&self.selection.tenant))) => {
                self.metrics.journal_read(if announce { "replay" } else { "catchup" });
                read
            }
        };
        match read {
            Ok(batch) if batch.pruned > self.last => Read::Reset(PRUNED),
            Ok(batch) if batch.void => Read::Reset(CRASHED),
            Ok(batch) => Read::Batch(batch),
            Err(err) => {
                // The client reconnects with its Last-Event-ID and resumes.
                tracing::warn!(cause = %err, "journal read failed; ending the stream");
                self.done = true;
                Read::End(None)
            }
        }
    }

    /// The timer fired: the token expired, or a heartbeat is due (and the next one is set).
    fn on_timer(&mut self) -> Option<Bytes> {
        let now = Instant::now();
        if self.expires.is_some_and(|at| at <= now) {
            return self.finish_expired();
        }
        let deadline = next_timer(now + self.heartbeat, self.expires);
        self.timer.as_mut().reset(deadline);
        Some(frame::keepalive(self.format))
    }

    /// The subscriber fell behind the live buffer: catch up from the journal after `last`,
    /// then rejoin live (duplicates are dropped by position).
    fn lagged(&mut self, missed: u64) {
        tracing::debug!(missed, position = %self.last, "subscriber lagged; catching up from the journal");
        self.metrics.lagged.inc();
        self.mode = Mode::Replay { announce: false };
    }

    /// The hub closed the channel: the feed has a gap (changes pruned before the listener
    /// published them, [`crate::hub::Hub::gap`]). Take a fresh receiver, then catch up
    /// from the journal, which answers `reset` for a position older than it keeps. Or the
    /// journal was recreated ([`crate::hub::Hub::restart`]): then `reset` at once.
    fn gap(&mut self) {
        if self.subscription.resubscribe() {
            tracing::debug!(position = %self.last, "the journal was recreated; sending reset");
            self.mode = Mode::Restarted;
            return;
        }
        tracing::debug!(position = %self.last, "the live feed has a gap; catching up from the journal");
        self.mode = Mode::Replay { announce: false };
    }

    /// Appends whatever else is already waiting, up to [`MAX_CHUNK`].
    fn drain(&mut self, chunk: &mut Chunk) {
        while chunk.len() < MAX_CHUNK {
            match self.subscription.receiver.try_recv() {
                Ok(change) => self.take(&change, chunk),
                Err(TryRecvError::Lagged(missed)) => {
                    self.lagged(missed);
                    return;
                }
                Err(TryRecvError::Empty | TryRecvError::Closed) => return,
            }
        }
    }

    /// The subscriber's position is not in the journal (older than it keeps, or from a
    /// journal that was recreated): tell it, with `reason`, to refetch its state and
    /// continue from the head, which this stream then follows.
    async fn reset(&mut self, reason: &'static str) -> Option<Bytes> {
        let head = match Box::pin(self.journal.head()).await {
            Ok(head) => head,
            Err(err) => {
                tracing::warn!(cause = %err, "reading the head for a reset failed; ending the stream");
                self.done = true;
                return None;
            }
        };
        let event = frame::control(self.format, Control::Reset(reason), head);
        self.metrics.resets.inc();
        self.last = head;
        self.mode = Mode::Replay { announce: true };
        Some(event)
    }

    fn finish_shutdown(&mut self) -> Option<Bytes> {
        self.done = true;
        Some(frame::control(self.format, Control::Shutdown, self.last))
    }

    fn finish_expired(&mut self) -> Option<Bytes> {
        self.done = true;
        Some(frame::control(self.format, Control::Expired, self.last))
    }
}

/// The earlier of the next heartbeat and the expiry.
fn next_timer(heartbeat: Instant, expires: Option<Instant>) -> Instant {
    expires.map_or(heartbeat, |at| at.min(heartbeat))
}

impl Drop for EventStream {
    fn drop(&mut self) {
        tracing::info!(
            tenant = %crate::logging::Untrusted(&self.selection.tenant),
            duration_ms = self.opened.elapsed().as_millis() as u64,
            events = self.delivered,
            position = %self.last,
            "stream closed"
        );
    }
}
