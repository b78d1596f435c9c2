//! Reading /proc. A process is identified by its pid AND its start time
//! (field 22 of /proc/PID/stat, clock ticks since boot): a pid recorded in
//! the journal may have been reused by an unrelated process by the time we
//! act on it again, and signalling that one would be a real accident.

use std::{fs, io, path::Path};

use serde::{Deserialize, Serialize};

/// A process as recorded in the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProcId {
    pub pid: u32,
    pub start_time: u64,
}

/// PF_KTHREAD in /proc/PID/stat flags (include/linux/sched.h): kernel threads
/// ignore signals and are never chosen by name.
const PF_KTHREAD: u32 = 0x0020_0000;

/// The fields of /proc/PID/stat that chaosd uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub comm: String,
    /// R, S, D, T (stopped), t, Z (zombie), X, I, ...
    pub state: char,
    pub ppid: u32,
    pub flags: u32,
    /// Clock ticks.
    pub utime: u64,
    pub stime: u64,
    pub start_time: u64,
    /// Resident pages.
    pub rss_pages: u64,
}

impl Stat {
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }
    /// Exited but not yet reaped, or being torn down.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
    pub fn is_stopped(&self) -> bool {
        self.state == 'T'
    }
}

/// Parses /proc/PID/stat. The comm field is in parentheses and may itself
/// contain spaces and parentheses, hence the search for the last ')'.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); field N is rest[N - 3].
    let field = |n: usize| rest.get(n - 3).copied();
    let num = |n: usize| field(n).and_then(|s| s.parse::<u64>().ok());
    Some(Stat {
        comm,
        state: field(3)?.chars().next()?,
        ppid: u32::try_from(num(4)?).ok()?,
        flags: u32::try_from(num(9)?).ok()?,
        utime: num(14)?,
        stime: num(15)?,
        start_time: num(22)?,
        rss_pages: field(24)?.parse::<i64>().ok()?.max(0) as u64,
    })
}

pub fn stat(pid: u32) -> io::Result<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unparsable /proc/{pid}/stat")))
}

/// The identity of a live (not zombie) process, or None.
pub fn identify(pid: u32) -> Option<(ProcId, Stat)> {
    let st = stat(pid).ok()?;
    if st.is_dead() {
        return None;
    }
    Some((ProcId { pid, start_time: st.start_time }, st))
}

/// The process is still the one recorded, and has not exited.
pub fn is_alive(id: ProcId) -> bool {
    matches!(stat(id.pid), Ok(st) if st.start_time == id.start_time && !st.is_dead())
}

/// Stat of the recorded process if it is still that process (zombies
/// included, so a caller can tell "exited" from "reused").
pub fn stat_if_same(id: ProcId) -> Option<Stat> {
    stat(id.pid).ok().filter(|st| st.start_time == id.start_time)
}

/// Every process (thread-group leader) in /proc.
pub fn all_pids() -> io::Result<Vec<u32>> {
    pids_in(Path::new("/proc"))
}

fn pids_in(dir: &Path) -> io::Result<Vec<u32>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
            out.push(pid);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// argv of a process (empty for kernel threads and zombies).
pub fn cmdline(pid: u32) -> io::Result<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(raw.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect())
}

pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 { v as u64 } else { 100 }
}

pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 { v as u64 } else { 4096 }
}

pub fn online_cpus() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if v > 0 { v as u64 } else { 1 }
}

/// MemTotal of /proc/meminfo in bytes.
pub fn mem_total_bytes() -> io::Result<u64> {
    let text = fs::read_to_string("/proc/meminfo")?;
    parse_meminfo_total(&text).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no MemTotal in /proc/meminfo"))
}

fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Anonymous resident memory (RssAnon of /proc/PID/status): what a memory
/// stressor holds, without the chaosd binary's own mapped pages.
pub fn rss_anon_bytes(pid: u32) -> io::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(kib * 1024)
}

/// CPU time (user + system) of a process in nanoseconds.
pub fn cpu_time_ns(st: &Stat) -> u64 {
    (st.utime + st.stime) * (1_000_000_000 / clock_ticks_per_second())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_parentheses_and_spaces_in_comm() {
        let text = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 123456 1000000 250 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let st = parse_stat(text).unwrap();
        assert_eq!(st.comm, "a) b (c)");
        assert_eq!(st.state, 'S');
        assert_eq!(st.ppid, 1);
        assert_eq!((st.utime, st.stime), (7, 3));
        assert_eq!(st.start_time, 123456);
        assert_eq!(st.rss_pages, 250);
        assert!(!st.is_kernel_thread());
    }

    #[test]
    fn kernel_threads_are_recognised() {
        let text = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0 18446744073709551615 0 0 0 0 0 0 0 2147483647 0 0 0 0 17 0 0 0 0 0 0";
        assert!(parse_stat(text).unwrap().is_kernel_thread());
    }

    #[test]
    fn own_process_is_alive_and_reused_start_time_is_not() {
        let pid = std::process::id();
        let (id, st) = identify(pid).unwrap();
        assert!(is_alive(id));
        assert!(!st.is_dead());
        assert!(!is_alive(ProcId { pid, start_time: id.start_time + 1 }));
    }

    #[test]
    fn meminfo_total() {
        assert_eq!(parse_meminfo_total("MemTotal:       24684092 kB\nMemFree: 1 kB\n"), Some(24684092 * 1024));
    }
}
