//! Which processes a fault acts on, and the ones it must never act on:
//! chaosd itself (it would stop the thing that undoes the fault), its
//! clients (see `clients`) and PID 1 (stopping or killing init takes the
//! host down with it).

use std::collections::BTreeMap;

use crate::{
    error::ApiError,
    process::{
        clients::Spared,
        procfs::{self, ProcId, Stat},
    },
};

/// A pid given with `--pid`: it must exist, not have exited, and be
/// neither PID 1 nor chaosd. `hint` says what to use instead of PID 1.
pub fn check_pid(pid: u32, hint: &str) -> Result<(ProcId, Stat), ApiError> {
    if pid == 1 {
        return Err(ApiError::InvalidArgument(format!("refusing to target PID 1 (init): {hint}")));
    }
    if pid == std::process::id() {
        return Err(ApiError::InvalidArgument(format!("pid {pid} is chaosd itself; target another process")));
    }
    let st = match procfs::stat(pid) {
        Ok(st) => st,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::NotFound(format!("pid {pid} does not exist")));
        }
        Err(e) => return Err(ApiError::Internal(format!("reading /proc/{pid}/stat: {e}"))),
    };
    if st.is_dead() {
        return Err(ApiError::NotFound(format!("pid {pid} has exited")));
    }
    if st.is_kernel_thread() {
        return Err(ApiError::InvalidArgument(format!("pid {pid} ({}) is a kernel thread", st.comm)));
    }
    Ok((ProcId { pid, start_time: st.start_time }, st))
}

/// The kernel truncates comm to 15 bytes (TASK_COMM_LEN - 1).
pub const COMM_MAX: usize = 15;

/// Every user process whose comm is exactly `name`.
pub fn by_name(name: &str) -> Result<BTreeMap<u32, ProcId>, ApiError> {
    let pids = procfs::all_pids().map_err(|e| ApiError::Internal(format!("listing /proc: {e}")))?;
    let mut out = BTreeMap::new();
    for pid in pids {
        let Ok(st) = procfs::stat(pid) else { continue };
        if st.comm == name && !st.is_kernel_thread() && !st.is_dead() {
            out.insert(pid, ProcId { pid, start_time: st.start_time });
        }
    }
    if out.is_empty() {
        let why = if name.len() > COMM_MAX {
            format!(
                "; the kernel keeps only the first {COMM_MAX} bytes of a process name, so try '{}'",
                &name[..name
                    .char_indices()
                    .take_while(|(i, _)| *i < COMM_MAX)
                    .last()
                    .map_or(0, |(i, c)| i + c.len_utf8())]
            )
        } else {
            String::new()
        };
        return Err(ApiError::NotFound(format!("no process is named '{name}' (exact match on /proc/PID/comm){why}")));
    }
    Ok(out)
}

/// Refuses a set of processes that contains chaosd or PID 1.
pub fn refuse_protected(pids: &BTreeMap<u32, ProcId>, what: &str) -> Result<(), ApiError> {
    if pids.contains_key(&1) {
        return Err(ApiError::InvalidArgument(format!("{what} would include PID 1 (init); refusing")));
    }
    let me = std::process::id();
    if pids.contains_key(&me) {
        return Err(ApiError::InvalidArgument(format!("{what} would include chaosd itself (pid {me}); refusing")));
    }
    Ok(())
}

/// Refuses a pid given with `--pid` that is connected to chaosd.
pub fn refuse_client(id: ProcId, clients: &[ProcId]) -> Result<(), ApiError> {
    if clients.contains(&id) {
        let comm = procfs::stat(id.pid).map(|s| s.comm).unwrap_or_default();
        return Err(ApiError::InvalidArgument(format!(
            "pid {} ({comm}) is connected to chaosd, and chaosd never signals its own clients (one may be what \
             recovers the fault); close its connection first or target another process",
            id.pid
        )));
    }
    Ok(())
}

/// Takes chaosd's clients out of a set of processes and returns them.
pub fn leave_out_clients(set: &mut BTreeMap<u32, ProcId>, clients: &[ProcId]) -> Vec<Spared> {
    let mut out = Vec::new();
    for c in clients {
        if set.get(&c.pid) == Some(c) {
            set.remove(&c.pid);
            let comm = procfs::stat(c.pid).map(|s| s.comm).unwrap_or_default();
            out.push(Spared { pid: c.pid, comm });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_left_out_and_others_kept() {
        let (me, st) = procfs::identify(std::process::id()).unwrap();
        let other = ProcId { pid: 4_000_000, start_time: 1 };
        let mut set = BTreeMap::from([(me.pid, me), (other.pid, other)]);
        // A client with the same pid but another start time is another
        // process (the pid was reused): not left out.
        let stale = ProcId { start_time: me.start_time + 1, ..me };
        assert!(leave_out_clients(&mut set, &[stale]).is_empty());
        let spared = leave_out_clients(&mut set, &[me]);
        assert_eq!(spared, [Spared { pid: me.pid, comm: st.comm }]);
        assert_eq!(set.keys().copied().collect::<Vec<_>>(), [other.pid]);
        let err = refuse_client(me, &[me]).unwrap_err().to_string();
        assert!(err.contains("connected to chaosd"), "{err}");
        assert!(refuse_client(me, &[other]).is_ok());
    }
}
