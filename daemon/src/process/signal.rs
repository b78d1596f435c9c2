//! Signalling exactly the process that was recorded, never a process that
//! later got the same pid: the pid is pinned with a pidfd, then its start
//! time is compared with the recorded one, then the signal goes through
//! the pidfd (pidfd_open(2), pidfd_send_signal(2), Linux 5.3).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::{errno::Errno, sys::signal::Signal};

use crate::process::procfs::{self, ProcId};

#[derive(Debug, thiserror::Error)]
#[error("{call} for pid {pid}: {errno}")]
pub struct SignalError {
    pub call: &'static str,
    pub pid: u32,
    pub errno: Errno,
}

/// A pidfd for `pid`, or None when no such process exists.
pub fn pidfd_open(pid: u32) -> Result<Option<OwnedFd>, SignalError> {
    // SAFETY: pidfd_open takes a pid and flags; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0 as libc::c_uint) };
    if fd < 0 {
        let errno = Errno::last();
        return if errno == Errno::ESRCH { Ok(None) } else { Err(SignalError { call: "pidfd_open", pid, errno }) };
    }
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// Sends `sig` (a raw number, so that any signal the engine validated can
/// be sent) to the recorded process. Ok(false): it is gone (exited, or the
/// pid now belongs to another process), nothing was sent.
pub fn signal_exact(id: ProcId, sig: i32) -> Result<bool, SignalError> {
    let Some(fd) = pidfd_open(id.pid)? else { return Ok(false) };
    // The pidfd was opened before this check: if the process now at this
    // pid started when the recorded one did, the pidfd refers to it.
    match procfs::stat(id.pid) {
        Ok(st) if st.start_time == id.start_time && !st.is_dead() => {}
        _ => return Ok(false),
    }
    // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if r < 0 {
        let errno = Errno::last();
        return if errno == Errno::ESRCH {
            Ok(false)
        } else {
            Err(SignalError { call: "pidfd_send_signal", pid: id.pid, errno })
        };
    }
    Ok(true)
}

pub fn stop(id: ProcId) -> Result<bool, SignalError> {
    signal_exact(id, Signal::SIGSTOP as i32)
}

pub fn resume(id: ProcId) -> Result<bool, SignalError> {
    signal_exact(id, Signal::SIGCONT as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_start_time_is_not_signalled() {
        let (id, _) = procfs::identify(std::process::id()).unwrap();
        // Signal 0 only checks; with a wrong start time nothing is sent.
        assert!(signal_exact(id, 0).unwrap());
        assert!(!signal_exact(ProcId { start_time: id.start_time + 1, ..id }, 0).unwrap());
    }
}
