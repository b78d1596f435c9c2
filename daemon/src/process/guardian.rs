//! The pause guardian: a small process (`chaosd pause-guardian`, comm
//! `chaosd-guardian`) that makes sure a paused process never stays paused
//! because the daemon died. It is started before the first SIGSTOP, learns
//! each paused process from the daemon over its stdin before that process
//! is stopped, and watches the daemon through a pidfd. It resumes them all
//! (SIGCONT) at the deadline, or a grace period after the daemon died,
//! whichever comes first, or at once on SIGTERM/SIGINT/SIGHUP. On "done"
//! (the daemon resumed them itself) or SIGUSR1 (a restarted daemon took
//! over) it exits without touching them.
//!
//! stdin lines: `pid PID START_TIME` | `done`.

use std::{
    collections::BTreeSet,
    ffi::CStr,
    io::{BufRead, BufReader, Write as _},
    os::{
        fd::{AsFd, AsRawFd},
        unix::process::CommandExt,
    },
    path::Path,
    process::{Child, ChildStdin, Command, ExitCode, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nix::sys::{
    signal::{SigSet, Signal},
    signalfd::{SfdFlags, SignalFd},
};

use crate::process::{
    procfs::{self, ProcId},
    signal,
};

pub const GUARDIAN_COMM: &str = "chaosd-guardian";

#[derive(clap::Args, Debug)]
pub struct GuardianArgs {
    /// Experiment the guardian belongs to (its mark).
    #[arg(long)]
    pub experiment: String,
    /// The daemon's pid, watched through a pidfd.
    #[arg(long)]
    pub daemon: u32,
    /// Resume this long after the daemon died (ms).
    #[arg(long)]
    pub grace_ms: u64,
    /// Resume at this wall-clock time (ms since the Unix epoch).
    #[arg(long)]
    pub deadline_unix_ms: Option<u64>,
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn resume_all(procs: &BTreeSet<ProcId>, why: &str) {
    let mut n = 0;
    for id in procs {
        match signal::resume(*id) {
            Ok(true) => n += 1,
            Ok(false) => {}
            Err(e) => eprintln!("chaosd-guardian: {e}"),
        }
    }
    eprintln!("chaosd-guardian: resumed {n} of {} paused process(es): {why}", procs.len());
}

pub fn run(args: GuardianArgs) -> ExitCode {
    let _ = nix::sys::prctl::set_name(c"chaosd-guardian" as &CStr);
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGUSR1] {
        mask.add(s);
    }
    if let Err(e) = mask.thread_block() {
        eprintln!("chaosd-guardian: blocking signals: {e}");
        return ExitCode::FAILURE;
    }
    let sigfd = match SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("chaosd-guardian: signalfd: {e}");
            return ExitCode::FAILURE;
        }
    };
    // All the guardian ever does is signal other users' processes.
    let kill_only: caps::CapsHashSet = [caps::Capability::CAP_KILL].into_iter().collect();
    for set in [caps::CapSet::Ambient, caps::CapSet::Inheritable] {
        let _ = caps::clear(None, set);
    }
    for set in [caps::CapSet::Effective, caps::CapSet::Permitted] {
        if let Err(e) = caps::set(None, set, &kill_only) {
            eprintln!("chaosd-guardian: narrowing capabilities to CAP_KILL: {e}");
        }
    }
    // A daemon already gone at this point counts as dead from now on.
    let daemon = signal::pidfd_open(args.daemon).unwrap_or(None);
    let grace = Duration::from_millis(args.grace_ms);
    let mut daemon_died: Option<Instant> = if daemon.is_none() { Some(Instant::now()) } else { None };
    let mut procs = BTreeSet::new();
    let stdin = std::io::stdin();
    let stdin_fd = stdin.as_fd().as_raw_fd();
    let mut reader = BufReader::new(stdin.lock());
    let mut stdin_open = true;
    loop {
        // Next wake-up: the deadline or the end of the grace period.
        let mut wait_ms: Option<u64> = args.deadline_unix_ms.map(|d| d.saturating_sub(now_unix_ms()));
        if let Some(died) = daemon_died {
            let left = grace.saturating_sub(died.elapsed()).as_millis() as u64;
            wait_ms = Some(wait_ms.map_or(left, |w| w.min(left)));
        }
        if wait_ms == Some(0) {
            let why = if args.deadline_unix_ms.is_some_and(|d| now_unix_ms() >= d) {
                "the deadline passed"
            } else {
                "the daemon died and the grace period is over"
            };
            resume_all(&procs, why);
            return ExitCode::SUCCESS;
        }
        // In this order: pid lines already sent are read before a signal
        // that arrived with them is acted on.
        let mut fds = Vec::with_capacity(3);
        if stdin_open {
            fds.push(libc::pollfd { fd: stdin_fd, events: libc::POLLIN, revents: 0 });
        }
        if let (Some(d), None) = (&daemon, daemon_died) {
            fds.push(libc::pollfd { fd: d.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        fds.push(libc::pollfd { fd: sigfd.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 });
        // Wake at least twice a second to notice that every guarded
        // process is gone (nothing left to resume: exit).
        let timeout = wait_ms.map_or(500, |w| w.min(500)) as i32;
        // SAFETY: fds is a valid array of pollfd of the given length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!("chaosd-guardian: poll: {}", std::io::Error::last_os_error());
            resume_all(&procs, "the guardian cannot wait any more");
            return ExitCode::FAILURE;
        }
        if !procs.is_empty() && !procs.iter().any(|id| procfs::is_alive(*id)) {
            return ExitCode::SUCCESS;
        }
        for p in &fds {
            if p.revents == 0 {
                continue;
            }
            if p.fd == sigfd.as_fd().as_raw_fd() {
                if let Ok(Some(info)) = sigfd.read_signal() {
                    if info.ssi_signo == Signal::SIGUSR1 as u32 {
                        eprintln!("chaosd-guardian: dismissed by the daemon (experiment {})", args.experiment);
                        return ExitCode::SUCCESS;
                    }
                    resume_all(&procs, "the guardian was asked to stop");
                    return ExitCode::SUCCESS;
                }
            } else if p.fd == stdin_fd {
                // The daemon writes whole lines (one small write each);
                // handle every line already buffered, since poll does not
                // see what BufReader holds.
                loop {
                    let mut line = String::new();
                    match reader.read_line(&mut line) {
                        Ok(n) if n > 0 => {
                            let f: Vec<&str> = line.split_whitespace().collect();
                            match f[..] {
                                ["done"] => return ExitCode::SUCCESS,
                                ["pid", pid, start] => {
                                    if let (Ok(pid), Ok(start_time)) = (pid.parse(), start.parse()) {
                                        procs.insert(ProcId { pid, start_time });
                                    }
                                }
                                _ => eprintln!("chaosd-guardian: ignoring {line:?}"),
                            }
                        }
                        // EOF without "done": the daemon is gone; the pidfd
                        // tells the same, this covers a pidfd that could not
                        // be opened.
                        _ => {
                            stdin_open = false;
                            daemon_died.get_or_insert_with(Instant::now);
                            break;
                        }
                    }
                    if reader.buffer().is_empty() {
                        break;
                    }
                }
            } else {
                daemon_died.get_or_insert_with(Instant::now);
            }
        }
    }
}

/// The daemon's side of one guardian.
pub struct Guardian {
    child: Child,
    stdin: Option<ChildStdin>,
    pub id: ProcId,
}

impl Guardian {
    pub fn spawn(exe: &Path, experiment: &str, grace: Duration, deadline: Option<SystemTime>) -> std::io::Result<Self> {
        let mut cmd = Command::new(exe);
        cmd.arg0(GUARDIAN_COMM)
            .args(["pause-guardian", "--experiment", experiment, "--daemon", &std::process::id().to_string()])
            .args(["--grace-ms", &grace.as_millis().to_string()]);
        if let Some(d) = deadline {
            let ms = d.duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
            cmd.args(["--deadline-unix-ms", &ms.to_string()]);
        }
        // Its own session: terminal signals and a process-group kill aimed
        // at the daemon do not reach it. The signals it handles are blocked
        // before exec (the mask survives exec), so one sent before it has
        // its signalfd stays pending instead of killing it with the
        // default action and leaving the processes stopped.
        // SAFETY: setsid, sigemptyset, sigaddset and sigprocmask are
        // async-signal-safe and only touch the local set.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1] {
                    libc::sigaddset(&mut set, sig);
                }
                if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::inherit()).spawn()?;
        let stdin = child.stdin.take();
        let pid = child.id();
        let start_time = procfs::stat(pid).map(|s| s.start_time).unwrap_or(0);
        Ok(Self { child, stdin, id: ProcId { pid, start_time } })
    }

    /// Tells the guardian about a process before it is stopped.
    pub fn add(&mut self, id: ProcId) -> std::io::Result<()> {
        let stdin = self.stdin.as_mut().ok_or_else(|| std::io::Error::other("guardian already finished"))?;
        stdin.write_all(format!("pid {} {}\n", id.pid, id.start_time).as_bytes())?;
        stdin.flush()
    }

    /// The guardian has exited (killed, or resumed at its deadline).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// The processes were resumed by the daemon: the guardian exits.
    pub fn finish(mut self) -> Result<(), String> {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"done\n");
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!("pause guardian pid {} did not exit on request; killed it", self.id.pid));
                }
            }
        }
    }
}

/// Guardians of other daemons (or of this one's previous life) for an
/// experiment, or for any experiment with `None`: (identity, experiment,
/// daemon pid from argv).
pub fn find_guardians(experiment: Option<&str>) -> Vec<(ProcId, String, Option<u32>)> {
    let mut out = Vec::new();
    for pid in procfs::all_pids().unwrap_or_default() {
        let Some((id, st)) = procfs::identify(pid) else { continue };
        // argv[0] is set by exec; comm only once the guardian has renamed
        // itself a moment later, so either marks it.
        let argv = procfs::cmdline(pid).unwrap_or_default();
        let marked = st.comm == GUARDIAN_COMM || argv.first().is_some_and(|a| a == GUARDIAN_COMM);
        if !marked || !argv.iter().any(|a| a == "pause-guardian") {
            continue;
        }
        let arg = |name: &str| argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1)).cloned();
        let Some(exp) = arg("--experiment") else { continue };
        if experiment.is_some_and(|e| e != exp) {
            continue;
        }
        out.push((id, exp, arg("--daemon").and_then(|d| d.parse().ok())));
    }
    out
}
