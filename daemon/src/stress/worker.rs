//! The stressor process: `chaosd stressor --experiment ID --parent PID cpu
//! --load N` or `... memory --bytes N`, a re-exec of the chaosd binary
//! started by `spawn`. It marks itself (comm `chaosd-stressor`, the
//! experiment id in argv) so that a sweep can find it, makes sure it dies
//! with the daemon, and waits on stdin for the go byte that the daemon sends
//! once the stressor is inside the target's cgroups.

use std::{
    ffi::CStr,
    io::Read,
    process::ExitCode,
    time::{Duration, Instant},
};

use caps::CapSet;

/// comm of every stressor (15 bytes, the kernel's limit).
pub const STRESSOR_COMM: &str = "chaosd-stressor";
/// Duty-cycle period: short enough that the load looks steady to anything
/// sampling the cgroup (and to the target's CFS quota period, 100 ms by
/// default), long enough that the clock reads cost nothing.
pub const PERIOD: Duration = Duration::from_millis(100);

#[derive(clap::Args, Debug)]
pub struct StressorArgs {
    /// Experiment the stressor belongs to (its mark, for sweeps).
    #[arg(long)]
    pub experiment: String,
    /// The daemon's pid: the stressor exits at once when its parent is
    /// another process (the daemon died before the stressor armed
    /// PR_SET_PDEATHSIG).
    #[arg(long)]
    pub parent: u32,
    #[command(subcommand)]
    pub mode: StressorMode,
}

#[derive(clap::Subcommand, Debug)]
pub enum StressorMode {
    /// Hold LOAD percent of one CPU.
    Cpu {
        #[arg(long)]
        load: u32,
    },
    /// Allocate, touch and hold BYTES of anonymous memory.
    Memory {
        #[arg(long)]
        bytes: u64,
        /// The daemon set oom_score_adj 0 instead of 1000 (shown here so
        /// that ps tells the two apart).
        #[arg(long)]
        oom_target: bool,
    },
}

pub fn run(args: StressorArgs) -> ExitCode {
    // The daemon set PR_SET_PDEATHSIG before exec, but the kernel clears it
    // when exec raises the permitted capabilities (commit_creds), which is
    // the case for a root daemon that narrowed its own: arm it again, then
    // check that the parent is still the daemon to close the race.
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number, no pointers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
        eprintln!("chaosd-stressor: prctl(PR_SET_PDEATHSIG): {}", std::io::Error::last_os_error());
        return ExitCode::FAILURE;
    }
    if nix::unistd::getppid().as_raw() as u32 != args.parent {
        return ExitCode::FAILURE;
    }
    let name: &CStr = c"chaosd-stressor";
    let _ = nix::sys::prctl::set_name(name);
    // A stressor needs no privilege; exec as root gave it every capability.
    for set in [CapSet::Ambient, CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        let _ = caps::clear(None, set);
    }
    let mut go = [0u8; 1];
    match std::io::stdin().read(&mut go) {
        Ok(1) if go[0] == b'g' => {}
        // The daemon gave up (apply failed) before releasing us.
        _ => return ExitCode::SUCCESS,
    }
    match args.mode {
        StressorMode::Cpu { load } => burn_cpu(load),
        StressorMode::Memory { bytes, .. } => hold_memory(bytes),
    }
}

fn process_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What a duty cycle decides at each clock check.
#[derive(Debug, Clone, Copy)]
pub struct DutyCycle {
    /// CPU ns owed per period.
    quota: i64,
    /// Process CPU time at which the schedule starts (moved forward when a
    /// debt is forgiven).
    base: i64,
}

impl DutyCycle {
    pub fn new(load_percent: u32, cpu_now: u64) -> Self {
        let quota = PERIOD.as_nanos() as i64 * i64::from(load_percent.min(100)) / 100;
        Self { quota, base: cpu_now as i64 }
    }

    /// Process CPU time to reach by the end of period `k` (0-based). The
    /// target is cumulative, so time lost to preemption in one period is
    /// made up in the next; but at most one period's quota of debt is
    /// carried, so a stressor starved for a minute (or paused) does not
    /// then burn at 100% until it has caught up.
    pub fn target(&mut self, k: u64, cpu_now: u64) -> u64 {
        let want = (k as i64 + 1) * self.quota;
        let now = cpu_now as i64;
        if self.base + want - now > 2 * self.quota {
            self.base = now + 2 * self.quota - want;
        }
        (self.base + want).max(0) as u64
    }
}

fn burn_cpu(load: u32) -> ExitCode {
    let start = Instant::now();
    let mut cycle = DutyCycle::new(load, process_cpu_ns());
    let mut k: u64 = 0;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    loop {
        let period_end = start + Duration::from_nanos(PERIOD.as_nanos() as u64 * (k + 1));
        let target = cycle.target(k, process_cpu_ns());
        while process_cpu_ns() < target && Instant::now() < period_end {
            // About 20-50 µs of work between clock reads.
            for _ in 0..20_000 {
                x = std::hint::black_box(x.rotate_left(5) ^ x.wrapping_mul(0x2545_f491_4f6c_dd1d));
            }
        }
        let now = Instant::now();
        if now < period_end {
            std::thread::sleep(period_end - now);
        }
        // Periods missed entirely (stopped, starved) are skipped, not
        // replayed.
        let elapsed = (Instant::now() - start).as_nanos() as u64 / PERIOD.as_nanos() as u64;
        k = (k + 1).max(elapsed);
    }
}

fn hold_memory(bytes: u64) -> ExitCode {
    let Ok(len) = usize::try_from(bytes) else { return ExitCode::FAILURE };
    if len == 0 {
        return sleep_forever();
    }
    // MAP_NORESERVE: the memory is charged when touched, as a leak's is, and
    // the cgroup's limit (not the overcommit heuristic) decides what happens.
    // SAFETY: a new private anonymous mapping; no existing memory is touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        eprintln!("chaosd-stressor: mmap of {len} bytes: {}", std::io::Error::last_os_error());
        return ExitCode::FAILURE;
    }
    let base = p.cast::<u8>();
    let page = crate::process::procfs::page_size() as usize;
    // One write per page allocates it. Distinct values per page, so that
    // zswap/zram's same-filled-page detection cannot store it for free.
    for off in (0..len.saturating_sub(7)).step_by(page) {
        // SAFETY: off + 8 <= len, inside the mapping created above; u8
        // pointer arithmetic, write_unaligned needs no alignment.
        unsafe { base.add(off).cast::<u64>().write_unaligned(off as u64 ^ 0x5a5a_5a5a_5a5a_5a5a) };
    }
    sleep_forever()
}

/// Holds what was allocated without using CPU until killed.
fn sleep_forever() -> ExitCode {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn quota_per_period() {
        let mut c = DutyCycle::new(50, 0);
        assert_eq!(c.target(0, 0), 50 * MS);
        assert_eq!(c.target(1, 50 * MS), 100 * MS);
    }

    #[test]
    fn a_short_deficit_is_made_up() {
        let mut c = DutyCycle::new(50, 0);
        // Period 0 got only 20 ms: period 1 aims at 100 ms cumulative.
        assert_eq!(c.target(1, 20 * MS), 100 * MS);
    }

    #[test]
    fn a_long_starvation_is_forgiven_beyond_one_period() {
        let mut c = DutyCycle::new(50, 0);
        // 100 periods later with nothing used: owe at most two quotas.
        let t = c.target(100, 0);
        assert_eq!(t, 2 * 50 * MS);
        // And from there on the pace is normal again.
        assert_eq!(c.target(101, t), t + 50 * MS);
    }
}
