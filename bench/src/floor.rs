//! The two floors the gateway is compared with: a plain tokio-postgres `LISTEN` client
//! hearing a raw NOTIFY from every insert statement in the same run (the latency floor),
//! and the CPU cost of one bare `write()` of a frame of the run's mean size to loopback
//! TCP (the CPU floor), measured after the gateway stops.

use std::io::{Read as _, Write as _};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::future::poll_fn;
use tokio_postgres::AsyncMessage;

use crate::database::pinned;
use crate::measure::{now_us, thread_cpu_s};
use crate::report::RunResult;

/// Writes timed at least, after the warm-up: the floor is a mean over many thousands.
pub(crate) const FLOOR_WRITES: u64 = 20_000;
/// Time spent writing at least, so that the tick-grained fallback of [`thread_cpu_s`]
/// still resolves the total to a few percent.
pub(crate) const FLOOR_MIN_TIME: Duration = Duration::from_millis(300);
/// Writes between two looks at the clock, and of the warm-up.
pub(crate) const FLOOR_BATCH: u64 = 1_000;

/// CPU time, in µs, of one `write()` of a `frame_bytes`-byte frame to a connected loopback
/// TCP socket: the least a delivery written on its own costs, whatever the gateway does
/// around it. Like the gateway's sockets, the writer has `TCP_NODELAY` (each write sends
/// its segment, as a lone frame does); a thread drains the other end so the writer never
/// waits for room. Only the writing thread's CPU counts; on loopback the kernel mostly
/// runs the receiving side's TCP input in the writer's context too, as it does for the
/// gateway's writes to the benchmark's streams.
pub(crate) fn write_floor_us(frame_bytes: usize) -> Result<f64> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let mut writer = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (reader, _) = listener.accept()?;
    writer.set_nodelay(true)?;
    let drainer = std::thread::spawn(move || drain(reader));
    let frame = vec![b'x'; frame_bytes.max(1)];
    for _ in 0..FLOOR_BATCH {
        writer.write_all(&frame)?;
    }
    let cpu0 = thread_cpu_s().context("reading /proc/thread-self")?;
    let start = Instant::now();
    let mut writes = 0u64;
    while writes < FLOOR_WRITES || start.elapsed() < FLOOR_MIN_TIME {
        for _ in 0..FLOOR_BATCH {
            writer.write_all(&frame)?;
        }
        writes += FLOOR_BATCH;
    }
    let cpu = thread_cpu_s().context("reading /proc/thread-self")? - cpu0;
    drop(writer);
    drainer
        .join()
        .map_err(|_| anyhow!("the write floor's reader panicked"))?;
    Ok(cpu * 1e6 / writes as f64)
}

/// Reads `stream` until the other end closes it.
pub(crate) fn drain(mut stream: std::net::TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

/// Measures the write floor for a frame of `frame_bytes` (the run's mean change frame) on
/// a blocking thread and sets it, with the gateway's CPU per delivery over it. Called
/// once the gateway has stopped: the floor neither competes with the gateway's work nor
/// counts in the write phase's CPU figures.
pub(crate) async fn set_write_floor(out: &mut RunResult, frame_bytes: usize) {
    let floor = tokio::task::spawn_blocking(move || write_floor_us(frame_bytes))
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
    match floor {
        Ok(us) if us > 0.0 => {
            out.set("write_floor_us", us);
            if let Some(gw) = out.figures.get("gw_cpu_us_per_delivery").copied() {
                out.set("gw_cpu_per_delivery_vs_write", gw / us);
            }
        }
        Ok(_) => {
            out.first_error
                .get_or_insert("write floor: no CPU time was counted".into());
        }
        Err(e) => {
            out.first_error.get_or_insert(format!("write floor: {e:#}"));
        }
    }
}

pub(crate) struct Floor {
    pub(crate) stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub(crate) thread: std::thread::JoinHandle<Result<Vec<(i64, u64)>>>,
}

impl Floor {
    /// Connects and LISTENs on its own thread and runtime, so the load generator's
    /// work does not delay its receipt timestamps.
    pub(crate) fn start(url: &str) -> Result<Floor> {
        let url = url.to_string();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("floor".into()).spawn(
            move || -> Result<Vec<(i64, u64)>> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let connecting =
                        async { pinned(&url)?.connect().await.map_err(anyhow::Error::from) };
                    let (client, mut conn) = match connecting.await {
                        Ok(pair) => pair,
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow!("floor connect: {e}")));
                            bail!("floor connect: {e}");
                        }
                    };
                    let pump = tokio::spawn(async move {
                        let mut heard = Vec::new();
                        while let Some(Ok(msg)) = poll_fn(|cx| conn.poll_message(cx)).await {
                            if let AsyncMessage::Notification(n) = msg {
                                let at = now_us();
                                if let Ok(sent) = n.payload().parse::<i64>() {
                                    heard.push((sent, at));
                                }
                            }
                        }
                        heard
                    });
                    let listen = format!("LISTEN {FLOOR_CHANNEL}");
                    if let Err(e) = client.batch_execute(&listen).await {
                        let _ = ready_tx.send(Err(anyhow!("floor LISTEN: {e}")));
                        bail!("floor LISTEN: {e}");
                    }
                    let _ = ready_tx.send(Ok(()));
                    let _ = stop_rx.await;
                    drop(client);
                    Ok(pump.await?)
                })
            },
        )?;
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow!("the floor listener did not start"))??;
        Ok(Floor {
            stop: Some(stop_tx),
            thread,
        })
    }

    pub(crate) fn finish(mut self) -> Result<Vec<(i64, u64)>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.thread
            .join()
            .map_err(|_| anyhow!("floor thread panicked"))?
    }
}

/// Latencies (µs) of the floor's notifications: receipt minus the send time they carry
/// (the first row of the statement that rang).
pub(crate) fn floor_latencies(heard: &[(i64, u64)], since_us: u64) -> Vec<u32> {
    heard
        .iter()
        .filter_map(|(sent, at)| {
            let s = u64::try_from(*sent).ok()?;
            (s >= since_us).then(|| u32::try_from(at.saturating_sub(s)).unwrap_or(u32::MAX))
        })
        .collect()
}

/// The channel of the raw NOTIFY the floor listens to.
pub(crate) const FLOOR_CHANNEL: &str = "pgfeed_bench_floor";
