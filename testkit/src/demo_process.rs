//! `pgfeed demo` as a child process, the way a user runs it: the built binary, its banner
//! read from stdout, stopped with SIGTERM. Shared by `tests/demo.rs` and
//! `tests/browser.rs`.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the demo may take to print its banner (a throwaway cluster's initdb included).
pub const START: Duration = Duration::from_secs(90);

/// Demos started by this test binary, for unique log names.
static STARTED: AtomicUsize = AtomicUsize::new(0);

/// A running `pgfeed demo`.
pub struct DemoProcess {
    /// The child.
    child: Child,
    /// Everything it printed on stdout so far.
    stdout: Arc<Mutex<String>>,
    /// Its stderr (the log), in a file so that a failing test can show it.
    log: PathBuf,
    /// Ends the child if the test process is killed.
    guard: Option<Child>,
    /// The banner, once printed.
    pub banner: Banner,
}

/// `pgfeed demo ARGS` with no database, secret or listen address of the caller's
/// environment and no stdin; the caller adds its own variables and output.
pub fn demo_command(args: &[&str]) -> Command {
    let mut command = Command::new(crate::pgfeed_bin());
    command
        .arg("demo")
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("PGFEED_DATABASE_URL")
        .env_remove("PGFEED_AUTH_SECRET")
        .env_remove("PGFEED_SERVER_LISTEN")
        .stdin(Stdio::null());
    command
}

/// What the banner says.
#[derive(Debug, Clone, Default)]
pub struct Banner {
    /// The live page's URL.
    pub page: String,
    /// The gateway's base URL.
    pub gateway: String,
    /// The `Database` line.
    pub database: String,
    /// The `psql` lines, as printed.
    pub psql: Vec<String>,
    /// The `curl -N` line, as printed.
    pub curl: String,
}

impl DemoProcess {
    /// Starts `pgfeed demo ARGS` with `env` added (and no database settings inherited),
    /// and waits for its banner.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> DemoProcess {
        let log = std::env::temp_dir().join(format!(
            "pgfeed-demo-test-{}-{}.log",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        let mut command = demo_command(args);
        command
            .env("PGFEED_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("starting pgfeed demo");
        let guard = reap_with_this_process(child.id(), false);
        let stdout = Arc::new(Mutex::new(String::new()));
        let pipe = child.stdout.take().expect("piped stdout");
        let sink = Arc::clone(&stdout);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut out = sink.lock().unwrap();
                out.push_str(&line);
                out.push('\n');
            }
        });
        let mut demo = DemoProcess {
            child,
            stdout,
            log,
            guard,
            banner: Banner::default(),
        };
        let deadline = Instant::now() + START;
        loop {
            if demo.stdout().contains("Stop with Ctrl-C.") {
                break;
            }
            if let Ok(Some(status)) = demo.child.try_wait() {
                panic!(
                    "pgfeed demo exited ({status}) before printing its banner:\n{}\n{}",
                    demo.stdout(),
                    demo.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "pgfeed demo printed no banner within {START:?}:\n{}\n{}",
                demo.stdout(),
                demo.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        demo.banner = parse_banner(&demo.stdout());
        demo
    }

    /// Its stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM (as Ctrl-C would SIGINT) and waits for the exit.
    pub fn stop(mut self) -> (ExitStatus, String, String) {
        self.terminate();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the demo") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "pgfeed demo did not exit within 30s of SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.disarm();
        // The reader thread may still hold the last lines.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.stdout) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        (status, self.stdout(), self.log())
    }

    fn disarm(&mut self) {
        if let Some(mut guard) = self.guard.take() {
            let _ = guard.kill();
            let _ = guard.wait();
        }
    }

    fn terminate(&mut self) {
        // Our own child, by its id.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }
}

impl Drop for DemoProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
            let deadline = Instant::now() + Duration::from_secs(20);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.disarm();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn parse_banner(text: &str) -> Banner {
    let mut banner = Banner::default();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line.starts_with("pgfeed demo is running") {
            banner.page = lines.find(|l| !l.is_empty()).expect("page URL").to_string();
        } else if let Some(rest) = line.strip_prefix("Gateway") {
            banner.gateway = rest.split_whitespace().next().expect("URL").to_string();
        } else if let Some(rest) = line.strip_prefix("Database") {
            banner.database = rest.trim().to_string();
        } else if line.starts_with("psql ") {
            banner.psql.push(line.to_string());
        } else if line.starts_with("curl -N ") {
            banner.curl = line.to_string();
        }
    }
    assert!(
        banner.page.starts_with("http://") && banner.gateway.starts_with("http://"),
        "banner: {text}"
    );
    assert_eq!(banner.psql.len(), 3, "three psql lines in: {text}");
    assert!(!banner.curl.is_empty(), "a curl line in: {text}");
    banner
}

/// Spawns a detached shell that sends SIGTERM to `child` (with `group`, to its whole
/// process group) if this test process dies first (killed by a timeout, say), so that no
/// demo or browser outlives its test. Kill the returned guard once the child has been
/// reaped normally.
pub fn reap_with_this_process(child: u32, group: bool) -> Option<Child> {
    let target = if group {
        // dash's kill takes no `--`; a negative pid after the signal means the group.
        format!("-{child}")
    } else {
        child.to_string()
    };
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -TERM {target} 2>/dev/null",
        me = std::process::id()
    );
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

/// A free TCP port on 127.0.0.1 (free now; the caller binds it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
