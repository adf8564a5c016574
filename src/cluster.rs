//! A throwaway PostgreSQL cluster: `initdb` into a temporary directory, `pg_ctl start` on a
//! free port of 127.0.0.1, and stop-and-remove at the end. `pgfeed demo`, the test suite and
//! the benchmark all start their clusters here.
//!
//! It uses the local installation only (found through `pg_config --bindir`, `PATH` or
//! `/usr/lib/postgresql/*/bin`) and never touches an existing cluster. initdb refuses to
//! run as root, so as root every command runs as the `postgres` user through `runuser`.
//! Besides [`Cluster::stop`], a detached watchdog stops and removes the cluster if the
//! process dies without cleaning up. Nothing here knows about pgfeed's schema.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Why the throwaway cluster could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No PostgreSQL server binaries on this machine.
    #[error(
        "PostgreSQL is not installed: a throwaway cluster needs the server programs initdb and \
         pg_ctl (looked in `pg_config --bindir`, PATH and /usr/lib/postgresql/*/bin). Install \
         them (Debian/Ubuntu: `sudo apt-get install postgresql`; Fedora: `sudo dnf install \
         postgresql-server`; macOS: `brew install postgresql`), or use an existing database \
         (DATABASE_URL for the demo, PGFEED_TEST_DATABASE_URL for the tests)"
    )]
    NotInstalled,
    /// Running as root, and the directory could not be handed to the `postgres` user.
    #[error(
        "initdb refuses to run as root, and handing {dir} to the `postgres` user failed: \
         create that user (installing the Debian package `postgresql` does), run as an \
         ordinary user, or use an existing database"
    )]
    NoPostgresUser {
        /// The cluster directory.
        dir: PathBuf,
    },
    /// A file-system operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A PostgreSQL program exited with an error.
    #[error("{program} failed: {output}")]
    Program {
        /// `initdb` or `pg_ctl`.
        program: &'static str,
        /// Its output.
        output: String,
    },
}

/// Where to look for the server programs; [`Search::local`] in the binary, an empty
/// machine in tests.
#[derive(Debug, Clone)]
pub struct Search {
    /// Ask `pg_config --bindir` first.
    pub pg_config: bool,
    /// The `PATH` to search.
    pub path: Option<std::ffi::OsString>,
    /// The directory holding one `<version>/bin` per installed major version.
    pub versions_dir: PathBuf,
}

impl Search {
    /// This machine: `pg_config`, the process `PATH`, then Debian's layout.
    pub fn local() -> Search {
        Search {
            pg_config: true,
            path: std::env::var_os("PATH"),
            versions_dir: PathBuf::from("/usr/lib/postgresql"),
        }
    }

    /// The directory holding `initdb` and `pg_ctl`, the newest version when several are
    /// installed side by side.
    pub fn bindir(&self) -> Option<PathBuf> {
        let usable = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
        if self.pg_config
            && let Ok(out) = Command::new("pg_config").arg("--bindir").output()
            && out.status.success()
        {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if usable(&dir) {
                return Some(dir);
            }
        }
        if let Some(path) = &self.path
            && let Some(dir) = std::env::split_paths(path).find(|d| usable(d))
        {
            return Some(dir);
        }
        let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(&self.versions_dir)
            .ok()?
            .filter_map(|e| {
                let e = e.ok()?;
                let version = e.file_name().to_str()?.parse().ok()?;
                Some((version, e.path().join("bin")))
            })
            .filter(|(_, dir)| usable(dir))
            .collect();
        found.sort();
        found.pop().map(|(_, dir)| dir)
    }
}

/// A running throwaway cluster. Dropping it without [`Cluster::stop`] stops and removes
/// it too (blocking), so an early error cannot leave it behind.
#[derive(Debug)]
pub struct Cluster {
    /// `bin` directory of the PostgreSQL installation used.
    bindir: PathBuf,
    /// The temporary directory holding everything (removed at the end).
    dir: PathBuf,
    /// The data directory inside it.
    data: PathBuf,
    /// TCP port on 127.0.0.1.
    port: u16,
    /// Whether programs run as the `postgres` user (we are root).
    as_postgres: bool,
    /// The detached process that cleans up if this one dies first.
    watchdog: Option<Child>,
    /// Whether the cluster was already stopped and removed.
    stopped: bool,
}

impl Cluster {
    /// Creates and starts a cluster in a fresh temporary directory. Blocking: run it on a
    /// blocking thread.
    pub fn start(search: &Search) -> Result<Cluster, ClusterError> {
        Cluster::start_with(search, "")
    }

    /// [`Cluster::start`] with extra `postgresql.conf` lines (e.g. `max_connections = 300`).
    pub fn start_with(search: &Search, extra_conf: &str) -> Result<Cluster, ClusterError> {
        let bindir = search.bindir().ok_or(ClusterError::NotInstalled)?;
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!(
            "pgfeed-demo-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).map_err(|source| ClusterError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let mut cluster = Cluster {
            bindir,
            data: dir.join("data"),
            dir,
            port: 0,
            as_postgres,
            watchdog: None,
            stopped: false,
        };
        if as_postgres {
            let handed = Command::new("chown")
                .arg("postgres:")
                .arg(&cluster.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !handed {
                return Err(ClusterError::NoPostgresUser {
                    dir: cluster.dir.clone(),
                });
            }
        }
        cluster.watchdog = cluster.spawn_watchdog();
        let data = cluster.data.display().to_string();
        cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-locale",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        // A throwaway cluster holds nothing worth an fsync; keep it fast and local-only.
        let conf = "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
                    listen_addresses = '127.0.0.1'\n";
        let conf_path = cluster.data.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap_or_default();
        text.push_str(conf);
        text.push_str(extra_conf);
        text.push('\n');
        std::fs::write(&conf_path, text).map_err(|source| ClusterError::Io {
            what: format!("writing {}", conf_path.display()),
            source,
        })?;
        // The port may be taken between choosing it and PostgreSQL binding it: try a few.
        let mut last = None;
        for _ in 0..5 {
            cluster.port = free_port().map_err(|source| ClusterError::Io {
                what: "finding a free port".into(),
                source,
            })?;
            match cluster.pg_ctl("start") {
                Ok(()) => return Ok(cluster),
                Err(err) => last = Some(err),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// `pg_ctl start` or `restart` (fast: open connections are cut), waiting until the
    /// server accepts connections.
    fn pg_ctl(&self, action: &str) -> Result<(), ClusterError> {
        let data = self.data.display().to_string();
        let opts = format!("-p {} -k {}", self.port, data);
        let log = self.data.join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                action, "-w", "-t", "60", "-m", "fast", "-D", &data, "-o", &opts, "-l", &log,
            ],
        )
    }

    /// Restarts the server: every connection is cut. Blocking.
    pub fn restart(&self) -> Result<(), ClusterError> {
        self.pg_ctl("restart")
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `bin` directory of the PostgreSQL installation used (pgbench lives there too).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The server's process id (from `postmaster.pid`), for measuring its CPU and memory.
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// The superuser URL of the cluster's `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The temporary directory holding the cluster.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the server (fast shutdown: open connections are cut) and removes its
    /// directory. Blocking.
    pub fn stop(mut self) -> Result<(), ClusterError> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), ClusterError> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let data = self.data.display().to_string();
        let stopped = if self.data.join("postmaster.pid").exists() {
            self.run(
                "pg_ctl",
                &["stop", "-w", "-t", "60", "-m", "fast", "-D", &data],
            )
        } else {
            Ok(())
        };
        let removed = std::fs::remove_dir_all(&self.dir).map_err(|source| ClusterError::Io {
            what: format!("removing {}", self.dir.display()),
            source,
        });
        if let Some(mut watchdog) = self.watchdog.take() {
            // Ours, by its own id; nothing is left for it to clean.
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        stopped.and(removed)
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, program: &'static str, args: &[&str]) -> Result<(), ClusterError> {
        let out = self
            .command(program)
            .args(args)
            // The `postgres` user may not be allowed into the caller's directory.
            .current_dir("/")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ClusterError::Io {
                what: format!("running {}", self.bindir.join(program).display()),
                source,
            })?;
        if out.status.success() {
            Ok(())
        } else {
            let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
            output.push_str(&String::from_utf8_lossy(&out.stderr));
            Err(ClusterError::Program {
                program,
                output: output.trim().to_string(),
            })
        }
    }

    /// A detached shell, in its own session so that Ctrl-C in the terminal does not reach
    /// it, that waits for this process to exit and then stops and removes the cluster.
    fn spawn_watchdog(&self) -> Option<Child> {
        let pg_ctl = self.bindir.join("pg_ctl");
        let runuser = if self.as_postgres {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             {runuser}'{pg_ctl}' stop -D '{data}' -m immediate >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            pg_ctl = pg_ctl.display(),
            data = self.data.display(),
            dir = self.dir.display(),
        );
        detached_shell(&script)
    }
}

/// Runs `script` with `sh` in a session of its own (so that Ctrl-C in the terminal does not
/// reach it), detached from this process's standard streams: for watchdogs that must
/// outlive a process killed by a signal, which runs no destructor.
pub fn detached_shell(script: &str) -> Option<Child> {
    Command::new("setsid")
        .args(["sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir("/")
        .spawn()
        .ok()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(err) = self.stop_inner() {
            tracing::warn!(cause = %err, "stopping the throwaway PostgreSQL");
        }
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_machine_without_postgresql_is_told_what_to_install() {
        let empty = std::env::temp_dir().join(format!("pgfeed-no-pg-{}", std::process::id()));
        std::fs::create_dir_all(&empty).unwrap();
        let search = Search {
            pg_config: false,
            path: Some(empty.clone().into_os_string()),
            versions_dir: empty.join("missing"),
        };
        let err = Cluster::start(&search).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ClusterError::NotInstalled), "{text}");
        assert!(text.contains("apt-get install postgresql"), "{text}");
        assert!(text.contains("DATABASE_URL"), "{text}");
        std::fs::remove_dir_all(&empty).unwrap();
    }

    #[test]
    fn the_newest_installed_version_wins() {
        let root = std::env::temp_dir().join(format!("pgfeed-pg-versions-{}", std::process::id()));
        for v in ["9", "13", "15"] {
            let bin = root.join(v).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            if v != "15" {
                std::fs::write(bin.join("initdb"), "").unwrap();
                std::fs::write(bin.join("pg_ctl"), "").unwrap();
            }
        }
        let search = Search {
            pg_config: false,
            path: None,
            versions_dir: root.clone(),
        };
        // 15 lacks the programs; 13 is newer than 9 numerically, not by name.
        assert_eq!(search.bindir(), Some(root.join("13").join("bin")));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
