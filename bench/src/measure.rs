//! Small measures: the shared wall clock, percentiles and medians, the open-file limit,
//! and /proc probes (RSS, the CPU time of a process, of a process tree, of a thread, of
//! the machine).

use std::process::Command;
use std::sync::LazyLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;

/// Wall-clock microseconds since the epoch: writers and readers share this clock.
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Nearest-rank percentile of sorted values.
pub(crate) fn percentile(sorted: &[u32], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(f64::from(sorted[rank.clamp(1, sorted.len()) - 1]))
}

pub(crate) fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// Raises the open-file limit to `want` (root may raise the hard limit too).
pub(crate) fn raise_nofile(want: u64) -> u64 {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    if soft >= want {
        return soft;
    }
    if rlimit::setrlimit(rlimit::Resource::NOFILE, want, want.max(hard)).is_ok() {
        return want;
    }
    rlimit::increase_nofile_limit(want).unwrap_or(soft)
}

// ---------------------------------------------------------------------------------------
// /proc probes
// ---------------------------------------------------------------------------------------

pub(crate) fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// (utime + stime in clock ticks, parent pid) of a process.
pub(crate) fn proc_stat(pid: u32) -> Option<(u64, u32)> {
    let (user, sys, ppid, _) = proc_times(pid)?;
    Some((user + sys, ppid))
}

/// (utime, stime, parent pid, cutime + cstime of reaped children; times in clock ticks)
/// of a process.
pub(crate) fn proc_times(pid: u32) -> Option<(u64, u64, u32, u64)> {
    stat_times(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// [`proc_times`]' fields out of the text of a `stat` file (a process's or a thread's).
pub(crate) fn stat_times(text: &str) -> Option<(u64, u64, u32, u64)> {
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((tick(11)?, tick(12)?, ppid, tick(13)? + tick(14)?))
}

/// CPU seconds used so far by the calling thread: the scheduler's nanosecond count
/// (`/proc/thread-self/schedstat`), else utime + stime in clock ticks
/// (`/proc/thread-self/stat`). The crate forbids `unsafe`, so no `clock_gettime`.
pub(crate) fn thread_cpu_s() -> Option<f64> {
    if let Ok(text) = std::fs::read_to_string("/proc/thread-self/schedstat")
        && let Some(ns) = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
    {
        return Some(ns as f64 / 1e9);
    }
    let (user, sys, _, _) = stat_times(&std::fs::read_to_string("/proc/thread-self/stat").ok()?)?;
    Some((user + sys) as f64 / *CLK_TCK)
}

/// Kernel CPU seconds used so far by `pid`.
pub(crate) fn sys_cpu_s(pid: u32) -> f64 {
    proc_times(pid).map_or(0.0, |(_, s, _, _)| s as f64 / *CLK_TCK)
}

/// Busy CPU seconds of the whole machine so far (all cores; /proc/stat).
pub(crate) fn machine_busy_s() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|i| f.get(*i)).sum();
    busy as f64 / *CLK_TCK
}

pub(crate) static CLK_TCK: LazyLock<f64> = LazyLock::new(|| {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
});

/// CPU seconds used so far by `pid`.
pub(crate) fn cpu_s(pid: u32) -> f64 {
    proc_stat(pid).map_or(0.0, |(t, _)| t as f64 / *CLK_TCK)
}

/// CPU seconds used so far by `pid` and its children (a postmaster and its backends): the
/// live ones, and those that exited and were reaped (the parent's `cutime` + `cstime`).
/// Without the reaped ones, the writers' backends, which exit when the write phase ends,
/// were left out of PostgreSQL's figure.
pub(crate) fn tree_cpu_s(pid: u32) -> f64 {
    let mut ticks = proc_times(pid).map_or(0, |t| t.0 + t.1 + t.3);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if let Some(child) = entry.file_name().to_str().and_then(|s| s.parse().ok())
                && let Some((t, ppid)) = proc_stat(child)
                && ppid == pid
            {
                ticks += t;
            }
        }
    }
    ticks as f64 / *CLK_TCK
}
/// The CPU counters a write phase is measured between.
pub(crate) struct CpuSnapshot {
    /// The gateway's CPU seconds.
    pub(crate) gateway: f64,
    /// PostgreSQL's (the postmaster and its backends), when the tool started it.
    pub(crate) postgres: Option<f64>,
    /// This process's.
    pub(crate) bench: f64,
    /// The gateway's kernel CPU seconds.
    pub(crate) gateway_sys: f64,
    /// The machine's busy CPU seconds.
    pub(crate) machine_busy: f64,
    pub(crate) at: Instant,
}

impl CpuSnapshot {
    /// The counters now, of the gateway `gateway_pid` and the postmaster `pg_pid`.
    pub(crate) fn take(gateway_pid: u32, pg_pid: Option<u32>) -> CpuSnapshot {
        CpuSnapshot {
            gateway: cpu_s(gateway_pid),
            postgres: pg_pid.map(tree_cpu_s),
            bench: cpu_s(std::process::id()),
            gateway_sys: sys_cpu_s(gateway_pid),
            machine_busy: machine_busy_s(),
            at: Instant::now(),
        }
    }
}
