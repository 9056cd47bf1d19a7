//! CPU time of processes, read from `/proc` (Linux): the service process, the worker process,
//! and PostgreSQL (the postmaster and every process it started, including children that have
//! already exited, whose time the postmaster collected). Ticks are USER_HZ (100 per second on
//! Linux), so a reading is good to 10 ms; the benchmark's windows hold thousands of steps.

use std::path::Path;

/// User + system CPU seconds of one process (all its threads).
pub fn process_cpu_secs(pid: u32) -> Option<f64> {
    let f = stat_fields(pid)?;
    // fields after the command: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17)
    Some((f.utime + f.stime) as f64 / TICKS)
}

/// CPU seconds of the PostgreSQL server that runs backend `backend_pid`: its postmaster,
/// every live child, and the children that exited (the postmaster's cutime/cstime).
pub fn postgres_cpu_secs(backend_pid: u32) -> Option<f64> {
    let postmaster = stat_fields(backend_pid)?.ppid;
    let pm = stat_fields(postmaster)?;
    let mut ticks = pm.utime + pm.stime + pm.cutime + pm.cstime;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(f) = stat_fields(pid) {
            if f.ppid == postmaster {
                ticks += f.utime + f.stime;
            }
        }
    }
    Some(ticks as f64 / TICKS)
}

/// Busy CPU seconds of the whole machine (all cores), from `/proc/stat`.
pub fn machine_busy_secs() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = text.lines().next()?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    Some((total - idle) as f64 / TICKS)
}

const TICKS: f64 = 100.0;

struct Fields {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

fn stat_fields(pid: u32) -> Option<Fields> {
    let text =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    // the command may contain spaces and parentheses: fields start after the last ')'
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
    Some(Fields {
        ppid: n(1)? as u32,
        utime: n(11)?,
        stime: n(12)?,
        cutime: n(13)?,
        cstime: n(14)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_cpu_reading() {
        let pid = std::process::id();
        // burn a little CPU so the reading cannot be a parse of garbage that happens to be 0
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(process_cpu_secs(pid).unwrap() > 0.0);
        assert!(machine_busy_secs().unwrap() > 0.0);
    }
}
