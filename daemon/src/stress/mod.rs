//! CPU and memory stress inside a target's cgroups. See architecture.md.
//!
//! Each worker is a child process (`worker`) started by the spawner thread,
//! written into the target's cgroups while it waits on a pipe, and only then
//! told to start. It dies with the daemon (PR_SET_PDEATHSIG) and is killed
//! and reaped at revert.

pub mod cgroup;
mod driver;
mod plan;
pub(crate) mod spawner;
pub mod worker;

pub use driver::StressDriver;

use crate::error::ApiError;

impl From<cgroup::CgroupError> for ApiError {
    fn from(e: cgroup::CgroupError) -> Self {
        use cgroup::CgroupError as E;
        match &e {
            E::Outside { .. } | E::LeadsOutside { .. } | E::NotInHierarchy { .. } => {
                ApiError::InvalidArgument(e.to_string())
            }
            E::Missing(_) => ApiError::NotFound(format!("{e}: create it first, or check the path")),
            E::DanglingLink { .. } => {
                ApiError::NotFound(format!("{e}: fix the link, or give the cgroup's own directory"))
            }
            E::NotACgroup { .. } => ApiError::InvalidArgument(format!(
                "{e}: give a directory of a mounted cgroup hierarchy (e.g. under /sys/fs/cgroup/memory on cgroup v1)"
            )),
            E::NoPid(_) => ApiError::NotFound(e.to_string()),
            E::NoHierarchy(_) => ApiError::Unavailable(e.to_string()),
            E::Write { source, .. } if source.raw_os_error() == Some(libc::EBUSY) => {
                ApiError::FailedPrecondition(format!(
                    "{e}: cgroup v2 puts processes only in leaf cgroups and this one has controllers \
                 enabled for its children (cgroup.subtree_control); target a leaf cgroup or --pid"
                ))
            }
            E::Read { .. } | E::Write { .. } | E::PidWithout { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

/// 512 MiB, 1.5 GiB: sizes in messages.
pub fn human_bytes(b: u64) -> String {
    // Up to EiB: u64 bytes end at 16 EiB, and "16777216 TiB" reads as a bug.
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.1} {}", UNITS[u]).replace(".0 ", " ") }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_up_to_exbibytes() {
        assert_eq!(super::human_bytes(512 << 20), "512 MiB");
        assert_eq!(super::human_bytes(u64::MAX), "16 EiB");
    }
}
