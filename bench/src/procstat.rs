//! CPU time and resident memory of a process, from `/proc`.

use std::fs;

/// Clock ticks per second of `utime`/`stime` in `/proc/PID/stat`.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// CPU time of `pid` ("self" for this process), in seconds: the sum of the
/// nanosecond run times of its live threads (`/proc/PID/task/*/schedstat`),
/// or, where the kernel has no schedstat, user plus system time in clock
/// ticks from `/proc/PID/stat` (10 ms resolution, too coarse to compare two
/// runs of a few seconds to within a percent).
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    schedstat_seconds(pid).or_else(|| stat_seconds(pid))
}

fn schedstat_seconds(pid: &str) -> Option<f64> {
    let mut total_ns = 0u64;
    let mut any = false;
    for entry in fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(entry) = entry else { continue };
        // A thread may exit between the listing and the read.
        let Ok(text) = fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        total_ns += text.split_ascii_whitespace().next()?.parse::<u64>().ok()?;
        any = true;
    }
    any.then(|| total_ns as f64 / 1e9)
}

fn stat_seconds(pid: &str) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

/// Resident set size of `pid` in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Snapshot of the CPU counters at an edge of a measured window: the
/// server's (when its pid is given) and this process's.
pub struct Mark {
    pub at: std::time::Instant,
    pub server_cpu: Option<f64>,
    pub client_cpu: Option<f64>,
}

pub fn mark(pid: Option<&str>) -> Mark {
    Mark {
        at: std::time::Instant::now(),
        server_cpu: pid.and_then(cpu_seconds),
        client_cpu: cpu_seconds("self"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        assert!(cpu_seconds("self").is_some());
        assert!(stat_seconds("self").is_some());
        assert!(rss_kib("self").unwrap() > 0);
    }

    #[test]
    fn schedstat_agrees_with_stat() {
        // A one-thread process that burns CPU: the test harness itself is
        // no good, its finished test threads count in stat but no longer
        // have a task entry to sum.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let pid = child.id().to_string();
        let (a, b) = (schedstat_seconds(&pid), stat_seconds(&pid));
        child.kill().unwrap();
        child.wait().unwrap();
        let (Some(a), Some(b)) = (a, b) else {
            return; // no schedstat on this kernel
        };
        assert!(a > 0.05, "the child ran only {a} s");
        assert!((a - b).abs() < 0.1, "schedstat {a} s vs stat {b} s");
    }
}
