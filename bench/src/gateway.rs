//! The gateway under test: `pgfeed serve` as a child process (its RSS and CPU its own;
//! a watchdog stops it if this tool dies) or `pgfeed::serve` on its own runtime in this
//! process; readiness, memory, its log, and its metrics read through the testkit's client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio_util::sync::CancellationToken;

use crate::SECRET;
use crate::cli::{Args, GatewayMode};
use crate::measure::{free_port, proc_status_kib};

pub(crate) enum GatewayKind {
    Process {
        child: Child,
        log: PathBuf,
        /// Stops the child if this tool dies without doing so (a signal).
        watchdog: Option<Child>,
    },
    InProcess {
        shutdown: CancellationToken,
        thread: Option<std::thread::JoinHandle<()>>,
    },
}

pub(crate) struct Gateway {
    pub(crate) addr: SocketAddr,
    /// Whose RSS and CPU are the gateway's (this process when in-process).
    pub(crate) pid: u32,
    pub(crate) kind: GatewayKind,
}

pub(crate) fn gateway_env(url: &str, extra: &[String]) -> Result<Vec<(String, String)>> {
    let mut env = vec![
        ("DATABASE_URL".to_string(), url.to_string()),
        ("PGFEED_AUTH_SECRET".to_string(), SECRET.to_string()),
        (
            "PGFEED_SERVER_MAX_SUBSCRIBERS".to_string(),
            "10000000".to_string(),
        ),
        (
            "PGFEED_SERVER_MAX_SUBSCRIBERS_PER_TENANT".to_string(),
            "10000000".to_string(),
        ),
        (
            "PGFEED_SERVER_MAX_STREAM_RATE".to_string(),
            "1000000".to_string(),
        ),
    ];
    for kv in extra {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--gateway-env {kv:?} is not KEY=VALUE"))?;
        env.retain(|(name, _)| name != k);
        env.push((k.to_string(), v.to_string()));
    }
    Ok(env)
}

pub(crate) fn pgfeed_binary(args: &Args) -> Result<PathBuf> {
    if let Some(bin) = &args.pgfeed_bin {
        return Ok(bin.clone());
    }
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("pgfeed");
    if bin.exists() {
        Ok(bin)
    } else {
        bail!(
            "the pgfeed binary was not found at {}: build both binaries (`cargo build --release \
             --bins`), pass --pgfeed-bin, or use --gateway in-process",
            bin.display()
        )
    }
}

impl Gateway {
    pub(crate) async fn start(args: &Args, url: &str, scratch: &Path) -> Result<Gateway> {
        let env = gateway_env(url, &args.gateway_env)?;
        let gateway = match args.gateway {
            GatewayMode::Process => {
                let bin = pgfeed_binary(args)?;
                let port = free_port()?;
                let log = scratch.join(format!("gateway-{port}.log"));
                let mut cmd = Command::new(&bin);
                cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")]);
                for (name, _) in std::env::vars() {
                    if name.starts_with("PGFEED_") || name == "DATABASE_URL" {
                        cmd.env_remove(name);
                    }
                }
                let child = cmd
                    .envs(env)
                    .env("PGFEED_LOG", "warn")
                    .env("NO_COLOR", "1")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log)?)
                    .spawn()
                    .with_context(|| format!("starting {}", bin.display()))?;
                let watchdog = gateway_watchdog(child.id());
                Gateway {
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    pid: child.id(),
                    kind: GatewayKind::Process {
                        child,
                        log,
                        watchdog,
                    },
                }
            }
            GatewayMode::InProcess => {
                let config = pgfeed::config::Config::load(&pgfeed::config::Sources {
                    file: None,
                    env,
                    flags: vec![("server.listen", "127.0.0.1:0".to_string())],
                })?;
                let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
                std_listener.set_nonblocking(true)?;
                let addr = std_listener.local_addr()?;
                let shutdown = CancellationToken::new();
                let stop = shutdown.clone();
                // Its own runtime and threads (`server.threads`, as `pgfeed serve`), so the
                // load generator does not share them.
                let threads = config.server.threads;
                let thread =
                    std::thread::Builder::new()
                        .name("gateway".into())
                        .spawn(move || {
                            let rt = tokio::runtime::Builder::new_multi_thread()
                                .worker_threads(threads)
                                .thread_name("gateway-worker")
                                .enable_all()
                                .build()
                                .expect("gateway runtime");
                            rt.block_on(async move {
                                let listener = tokio::net::TcpListener::from_std(std_listener)
                                    .expect("gateway listener");
                                if let Err(e) = pgfeed::serve(config, listener, stop).await {
                                    eprintln!("gateway: {e}");
                                }
                            });
                        })?;
                Gateway {
                    addr,
                    pid: std::process::id(),
                    kind: GatewayKind::InProcess {
                        shutdown,
                        thread: Some(thread),
                    },
                }
            }
        };
        let mut gateway = gateway;
        gateway.wait_ready().await?;
        Ok(gateway)
    }

    pub(crate) fn log_tail(&self) -> String {
        match &self.kind {
            GatewayKind::Process { log, .. } => std::fs::read_to_string(log)
                .map(|s| {
                    let lines: Vec<&str> = s.lines().collect();
                    lines[lines.len().saturating_sub(20)..].join("\n")
                })
                .unwrap_or_default(),
            GatewayKind::InProcess { .. } => String::new(),
        }
    }

    pub(crate) async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if get(self.addr, "/readyz")
                .await
                .is_some_and(|r| r.status == 200)
            {
                return Ok(());
            }
            if let GatewayKind::Process { child, .. } = &mut self.kind
                && !matches!(child.try_wait(), Ok(None))
            {
                bail!("the gateway exited during start-up:\n{}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!(
                    "the gateway was not ready within 60 s:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid, "VmRSS").unwrap_or(0)
    }

    pub(crate) fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid, "VmHWM").unwrap_or(0)
    }

    /// Counts of warnings and errors the gateway logged (process mode).
    pub(crate) fn log_problems(&self) -> (usize, Option<String>) {
        match &self.kind {
            GatewayKind::Process { log, .. } => {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let bad: Vec<&str> = text
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .collect();
                (bad.len(), bad.first().map(|s| s.to_string()))
            }
            GatewayKind::InProcess { .. } => (0, None),
        }
    }

    pub(crate) async fn stop(mut self) {
        match &mut self.kind {
            GatewayKind::Process { child, .. } => {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    if matches!(child.try_wait(), Ok(Some(_))) {
                        break;
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            GatewayKind::InProcess { shutdown, thread } => {
                shutdown.cancel();
                if let Some(t) = thread.take() {
                    let _ = tokio::task::spawn_blocking(move || t.join()).await;
                }
            }
        }
    }
}

/// Sums of the gateway's Prometheus counters by metric name (labels summed over), or an
/// empty map when /metrics does not answer.
pub(crate) async fn scrape_metrics(addr: SocketAddr) -> HashMap<String, f64> {
    let mut sums = HashMap::new();
    if let Some(r) = get(addr, "/metrics").await
        && r.status == 200
    {
        for line in r.body.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            if let Some(v) = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.trim().parse::<f64>().ok())
            {
                *sums.entry(name.to_string()).or_insert(0.0) += v;
            }
        }
    }
    sums
}

/// A detached shell (like the cluster's watchdog) that sends the gateway
/// SIGTERM if this process exits first, e.g. killed by a signal, which runs no
/// destructor. It ends by itself when the gateway is gone, and [`Gateway`]'s drop kills
/// it, so it never outlives the run it watches.
pub(crate) fn gateway_watchdog(gateway: u32) -> Option<Child> {
    let script = format!(
        "while kill -0 {me} 2>/dev/null && kill -0 {gateway} 2>/dev/null; do sleep 1; done; \
         kill -0 {me} 2>/dev/null || kill -TERM {gateway} 2>/dev/null",
        me = std::process::id(),
    );
    pgfeed::cluster::detached_shell(&script)
}

impl Drop for Gateway {
    /// An error path that never reached [`Gateway::stop`] must not leave the child running.
    fn drop(&mut self) {
        match &mut self.kind {
            GatewayKind::Process {
                child, watchdog, ..
            } => {
                if matches!(child.try_wait(), Ok(None)) {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                if let Some(mut watchdog) = watchdog.take() {
                    let _ = watchdog.kill();
                    let _ = watchdog.wait();
                }
            }
            GatewayKind::InProcess { shutdown, .. } => shutdown.cancel(),
        }
    }
}
/// A GET through the testkit's client (the tests' one), `None` unless it answers within
/// 15 s.
async fn get(addr: SocketAddr, path: &str) -> Option<pgfeed_testkit::Response> {
    tokio::time::timeout(
        Duration::from_secs(15),
        pgfeed_testkit::get(addr, path, &[]),
    )
    .await
    .ok()?
    .ok()
}
