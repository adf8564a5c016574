//! The log's way to stderr: never a panic, never a wait on the data path.
//!
//! Tasks format their lines and hand them to one thread that writes stderr, through a
//! bounded queue. A full queue (stderr is a pipe nobody reads fast enough) drops lines
//! and counts them; a broken stderr (`pgfeed serve 2>&1 | head -1`: EPIPE) stops the
//! writing and drops everything after it. Nothing here panics, so logging can never take
//! down the task that logs (a stream, the listener, the signal handler), and
//! tracing-subscriber's own fallback, which prints with `eprintln!` (a panic on a broken
//! stderr), is turned off.
//!
//! [`init_logging`] sets the subscriber up: the filter from `PGFEED_LOG` ([`log_filter`])
//! and the format from `log.format`.

use std::io::{self, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::config::{ConfigError, LogConfig};

/// Lines queued for the writer thread at most; more are dropped.
const QUEUE: usize = 4096;

/// Longest [`flush`] waits for the queue to reach stderr.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

enum Item {
    Line(Vec<u8>),
    Flush(SyncSender<()>),
}

struct Pipe {
    sender: SyncSender<Item>,
}

static PIPE: OnceLock<Pipe> = OnceLock::new();
/// Lines dropped because the queue was full or stderr broken.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Set once a write to stderr failed: nothing more is written.
static BROKEN: AtomicBool = AtomicBool::new(false);
/// Serializes a fallback synchronous write when the thread could not be started.
static FALLBACK: Mutex<()> = Mutex::new(());

fn pipe() -> Option<&'static Pipe> {
    if let Some(pipe) = PIPE.get() {
        return Some(pipe);
    }
    let (sender, receiver) = sync_channel(QUEUE);
    let started = std::thread::Builder::new()
        .name("pgfeed-log".into())
        .spawn(move || write_lines(receiver))
        .is_ok();
    if !started {
        return None;
    }
    // Another thread may have won the race; its pipe is used and this one's thread ends
    // when its sender is dropped here.
    Some(PIPE.get_or_init(|| Pipe { sender }))
}

fn write_lines(receiver: Receiver<Item>) {
    let mut stderr = io::stderr();
    while let Ok(item) = receiver.recv() {
        match item {
            Item::Line(line) => {
                if BROKEN.load(Ordering::Relaxed) {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if stderr.write_all(&line).is_err() {
                    BROKEN.store(true, Ordering::Relaxed);
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
            }
            Item::Flush(done) => {
                let _ = stderr.flush();
                let _ = done.try_send(());
            }
        }
    }
}

/// Writes `line` to stderr through the writer thread, dropping it if the queue is full.
/// Never blocks, never panics.
pub fn write_line(line: &[u8]) {
    match pipe() {
        Some(pipe) => match pipe.sender.try_send(Item::Line(line.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        },
        None => {
            // No thread: write directly, ignoring errors.
            let _guard = FALLBACK.lock().unwrap_or_else(PoisonError::into_inner);
            if !BROKEN.load(Ordering::Relaxed) && io::stderr().write_all(line).is_err() {
                BROKEN.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// Lines dropped so far (queue full or stderr broken).
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Waits (at most a second) until the lines queued so far reached stderr: at exit, so
/// that the last lines are not lost.
pub fn flush() {
    let Some(pipe) = PIPE.get() else {
        return;
    };
    let deadline = Instant::now() + FLUSH_WAIT;
    let (done, wait) = sync_channel(1);
    let mut item = Item::Flush(done);
    loop {
        match pipe.sender.try_send(item) {
            Ok(()) => break,
            Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                item = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
    let _ = wait.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}

/// A `MakeWriter` for tracing-subscriber: each event's formatted line goes to
/// [`write_line`].
#[derive(Clone, Copy, Debug, Default)]
pub struct StderrQueue;

/// One event's writer: gathers what the formatter writes, queues it when dropped.
#[derive(Debug, Default)]
pub struct QueuedLine(Vec<u8>);

impl io::Write for QueuedLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for QueuedLine {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            write_line(&self.0);
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for StderrQueue {
    type Writer = QueuedLine;

    fn make_writer(&'a self) -> QueuedLine {
        QueuedLine(Vec::with_capacity(256))
    }
}

/// Writes a message straight to stderr (the CLI's own output), ignoring a broken stderr
/// instead of panicking as `eprintln!` does.
pub fn eprint(message: &str) {
    let mut stderr = io::stderr().lock();
    let _ = stderr.write_all(message.as_bytes());
    let _ = stderr.write_all(b"\n");
}

/// A value that came from a client (a tenant claim, a header), for log fields: control
/// characters (`\n`, `\r`, ANSI escapes) are written escaped, so that no client can forge
/// a log line or drive the operator's terminal, and it is cut after 256 characters.
#[derive(Clone, Copy, Debug)]
pub struct Untrusted<'a>(pub &'a str);

impl std::fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        const MAX: usize = 256;
        for (i, c) in self.0.chars().enumerate() {
            if i == MAX {
                return f.write_str("…");
            }
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                for e in c.escape_default() {
                    f.write_char(e)?;
                }
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// An error with its causes, for one log field: `outer: cause: root cause`, each cause's
/// text once (drivers often repeat their cause in their own message).
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let more = cause.to_string();
            if !text.contains(&more) {
                text.push_str(": ");
                text.push_str(&more);
            }
            source = cause.source();
        }
        f.write_str(&text)
    }
}

/// Levels a bare `PGFEED_LOG` directive may name.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// The log filter `PGFEED_LOG` asks for: comma-separated directives, each a level
/// (`debug`) or `target=level` (`pgfeed=debug`, `tokio_postgres=warn`). A bare word that
/// is not a level (`verbose`, `debgu`) would silently filter on a module of that name and
/// log nothing: it is refused, as is an unknown level.
pub fn log_filter(text: &str) -> Result<tracing_subscriber::EnvFilter, ConfigError> {
    let refuse = |message: String| ConfigError::Source {
        origin: "environment variable PGFEED_LOG".into(),
        message,
    };
    if text.trim().is_empty() {
        return Ok(tracing_subscriber::EnvFilter::new("info"));
    }
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !directive.contains(['=', '[', ':']);
        if bare && !LOG_LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(refuse(format!(
                "{:?} is not a log level ({}) nor a `target=level` directive, like PGFEED_LOG=pgfeed=debug",
                directive.chars().take(64).collect::<String>(),
                LOG_LEVELS.join(", ")
            )));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(text)
        .map_err(|e| {
            refuse(format!(
                "{:?} is not a log filter ({e}); write levels ({}) or `target=level` directives, like PGFEED_LOG=pgfeed=debug",
                text.chars().take(64).collect::<String>(),
                LOG_LEVELS.join(", ")
            ))
        })
}

/// Starts logging to stderr: the filter from `PGFEED_LOG` (default `info`; an invalid one
/// is an error naming it), the format from `log.format`. Safe to call more than once (later
/// calls do nothing). Lines go through [`StderrQueue`], so a broken or stalled stderr
/// never panics or blocks a task that logs.
pub fn init_logging(log: &LogConfig) -> Result<(), ConfigError> {
    let filter = match std::env::var("PGFEED_LOG") {
        Err(std::env::VarError::NotPresent) => tracing_subscriber::EnvFilter::new("info"),
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(ConfigError::Source {
                origin: "environment variable PGFEED_LOG".into(),
                message: "is not valid UTF-8".into(),
            });
        }
        Ok(text) => log_filter(&text)?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .log_internal_errors(false)
        .with_writer(StderrQueue);
    let _ = if log.json() {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Untrusted;

    #[test]
    fn untrusted_values_cannot_forge_lines_or_escapes() {
        let forged = "acme\n2026-01-01T00:00:00Z ERROR pgfeed: forged\r\u{1b}[31mred\u{9b}";
        let shown = Untrusted(forged).to_string();
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.starts_with("acme\\n2026"), "{shown}");
        assert_eq!(Untrusted("plain tenant").to_string(), "plain tenant");
        assert_eq!(Untrusted(&"x".repeat(300)).to_string().chars().count(), 257);
    }
}
