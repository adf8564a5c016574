//! The `pgfeed` binary as a child process: the CLI commands on a test database
//! ([`pgfeed_command`], `pgfeed status --json`) and a `pgfeed serve` gateway
//! ([`ChildGateway`]) that tests stop, resume and kill with signals.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::{SECRET, SOON, SseClient, TestDb, assert_streams, get, get_soon, hs256_token, sample};

/// The `pgfeed` binary of this build: `target/<profile>/pgfeed`, beside the directory
/// holding the running test executable (`target/<profile>/deps/`). `PGFEED_BIN` overrides.
/// `cargo test` builds it for the product's own tests; a member tested alone needs
/// `cargo build --bin pgfeed` first, and this says so rather than running something stale.
pub fn pgfeed_bin() -> std::path::PathBuf {
    if let Some(bin) = std::env::var_os("PGFEED_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test executable lives in target/<profile>/deps");
    let bin = profile_dir.join(format!("pgfeed{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} does not exist: run `cargo build --bin pgfeed` (or the whole `cargo test`) first",
        bin.display()
    );
    bin
}

/// A local address whose port nobody listens on right now, for a child `pgfeed serve`.
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// The `pgfeed` binary with `args` on `db`, with a clean environment (no `PGFEED_*` of
/// the caller's but the test secret), killed when dropped.
pub fn pgfeed_command(db: &TestDb, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(crate::pgfeed_bin());
    cmd.args(args);
    on_test_db(cmd, db)
}

/// [`pgfeed_command`] run through `sh -c '{shell}; exec pgfeed ARGS'`, for what only the
/// shell can set before the gateway starts, such as `ulimit -n 128`.
pub fn pgfeed_shell_command(db: &TestDb, shell: &str, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!("{shell}; exec \"$0\" \"$@\""))
        .arg(crate::pgfeed_bin())
        .args(args);
    on_test_db(cmd, db)
}

/// `cmd` on `db` with the test secret, none of the caller's `PGFEED_*` variables (but the
/// test suite's `PGFEED_TEST_*`), killed when dropped.
fn on_test_db(mut cmd: tokio::process::Command, db: &TestDb) -> tokio::process::Command {
    cmd.env_remove("DATABASE_URL").kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("PGFEED_") && !k.starts_with("PGFEED_TEST_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("DATABASE_URL", &db.url)
        .env("PGFEED_AUTH_SECRET", SECRET);
    cmd
}

/// Runs [`pgfeed_command`] to its end; killed and the test failed after [`SOON`].
pub async fn pgfeed_cli(db: &TestDb, args: &[&str]) -> std::process::Output {
    let mut cmd = pgfeed_command(db, args);
    tokio::time::timeout(SOON, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("`pgfeed {}` did not finish within {SOON:?}", args.join(" ")))
        .expect("running pgfeed")
}

/// `pgfeed status --json` on `db`, parsed.
pub async fn status_json(db: &TestDb) -> serde_json::Value {
    let out = pgfeed_cli(db, &["status", "--json"]).await;
    assert!(
        out.status.success(),
        "pgfeed status --json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The entry of `table` (qualified) in `pgfeed status --json`, if it is listed.
pub async fn status_entry(db: &TestDb, table: &str) -> Option<serde_json::Value> {
    status_json(db).await["watched"]
        .as_array()
        .expect("status lists watched tables")
        .iter()
        .find(|w| w["table"] == table)
        .cloned()
}

/// The tables `pgfeed status --json` lists (its `watched` entries' `table`), in its order.
pub fn status_tables(status: &serde_json::Value) -> Vec<&str> {
    status["watched"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["table"].as_str().unwrap())
        .collect()
}

/// A `pgfeed serve` child process on a free port ([`pgfeed_command`]), for tests that stop
/// and resume the whole gateway with signals. Its log goes to a file; killed when dropped.
pub struct ChildGateway {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The process.
    pub child: tokio::process::Child,
    /// Its standard error (the log).
    pub log: std::path::PathBuf,
}

impl ChildGateway {
    /// Starts `pgfeed serve` on `db` on a free port with the environment variables `env`
    /// added, and waits until `/readyz` answers 200.
    pub async fn start(db: &TestDb, env: &[(&str, &str)]) -> ChildGateway {
        let addr = free_addr();
        let mut cmd = pgfeed_command(db, &["serve", "--listen", &addr.to_string()]);
        cmd.envs(env.iter().copied());
        ChildGateway::start_command(cmd, addr, None).await
    }

    /// Starts `cmd`, a `pgfeed serve` listening on `addr`, with its stderr to a log file
    /// (or to `stderr` when given, e.g. a pipe the test closes), and waits until `/readyz`
    /// answers 200.
    pub async fn start_command(
        mut cmd: tokio::process::Command,
        addr: SocketAddr,
        stderr: Option<std::process::Stdio>,
    ) -> ChildGateway {
        let log = std::env::temp_dir().join(format!(
            "pgfeed-child-{}-{}.log",
            std::process::id(),
            addr.port()
        ));
        let stderr = match stderr {
            Some(stderr) => stderr,
            None => std::fs::File::create(&log)
                .expect("creating the gateway's log file")
                .into(),
        };
        cmd.stdout(std::process::Stdio::null()).stderr(stderr);
        let mut child = cmd.spawn().expect("starting pgfeed serve");
        let deadline = Instant::now() + SOON;
        while !get(addr, "/readyz", &[])
            .await
            .is_ok_and(|r| r.status == 200)
        {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "pgfeed serve exited ({status}) before it was ready: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "pgfeed serve not ready within {SOON:?}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ChildGateway { addr, child, log }
    }

    /// Waits (at most [`SOON`]) for the process to exit and returns its status.
    pub async fn exited(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(SOON, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "pgfeed serve still running after {SOON:?}: {}",
                    self.log_text()
                )
            })
            .expect("waiting for pgfeed serve")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the gateway is running")
    }

    /// Sends it `signal` (a name as `kill` takes it: `STOP`, `CONT`, `TERM`).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} {}: {status}", self.pid());
    }

    /// Opens `tenant`'s whole stream and reads it up to `live`.
    pub async fn live(&self, tenant: &str) -> SseClient {
        let auth = format!("Bearer {}", hs256_token(tenant));
        assert_streams(self.addr, "/v1/stream", &[("Authorization", &auth)]).await
    }

    /// The value of the sample `name` on its `/metrics` page.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        sample(&get_soon(self.addr, "/metrics", &[]).await.body, name)
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too.
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Resident memory of this process, in KiB.
pub fn rss_kib() -> u64 {
    vm_rss_kib("/proc/self/status")
}

/// Resident memory of process `pid`, in KiB (0 when it cannot be read).
pub fn rss_kib_of(pid: u32) -> u64 {
    vm_rss_kib(&format!("/proc/{pid}/status"))
}

/// The `VmRSS` line of a `/proc/*/status` file, in KiB (0 when it cannot be read).
fn vm_rss_kib(status: &str) -> u64 {
    std::fs::read_to_string(status)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
