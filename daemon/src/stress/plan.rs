//! What a stress request means on this host, decided before anything is
//! started: the target's cgroups and each worker's command line, after the
//! checks that need the live system (worker count against the CPUs, size
//! against the host's memory, the target itself).

use super::{
    cgroup::{CgroupSet, Layout, Roots},
    human_bytes,
};
use crate::{
    error::ApiError,
    experiment::Experiment,
    process::{
        procfs::{self, ProcId},
        targets,
    },
    spec::{MemorySize, StressFault, Target},
};

/// How many workers per CPU are allowed without --force.
const WORKERS_PER_CPU: u64 = 4;

/// The target's cgroups, after checking the target.
pub(super) fn target_cgroups(roots: &Roots, target: &Target) -> Result<(CgroupSet, Option<ProcId>), ApiError> {
    let layout = Layout::detect(roots)?;
    match target {
        Target::Pid(pid) => {
            let (id, _) = targets::check_pid(*pid, "use --host to stress the whole host")?;
            let set = layout.of_pid(roots, *pid)?;
            // It may have exited while we read its cgroup.
            if !procfs::is_alive(id) {
                return Err(ApiError::NotFound(format!("pid {pid} exited")));
            }
            Ok((set, Some(id)))
        }
        Target::Cgroup(path) => Ok((layout.of_path(roots, path)?, None)),
        Target::Host => Ok((layout.root(), None)),
        other => Err(ApiError::InvalidArgument(format!("stress faults act on --pid, --cgroup or --host, not {other}"))),
    }
}

/// Arguments of each worker's `chaosd stressor` command line.
pub(super) fn plan(
    roots: &Roots,
    exp: &Experiment,
    fault: &StressFault,
    cgroups: &CgroupSet,
) -> Result<Vec<Vec<String>>, ApiError> {
    let cpus = procfs::online_cpus();
    let workers = match fault {
        StressFault::Cpu { workers, .. } | StressFault::Memory { workers, .. } => u64::from(*workers),
    };
    if workers == 0 {
        return Err(ApiError::InvalidArgument("workers must be at least 1".into()));
    }
    if workers > WORKERS_PER_CPU * cpus && !exp.forced {
        return Err(ApiError::InvalidArgument(format!(
            "{workers} workers is more than {WORKERS_PER_CPU}x the {cpus} CPUs of this host; \
             pass --force to start that many"
        )));
    }
    match fault {
        StressFault::Cpu { load_percent, .. } => {
            if cgroups.cpu.is_none() {
                return Err(ApiError::FailedPrecondition(format!(
                    "{} has no CPU accounting (no cpuacct hierarchy holds it); target a cgroup that exists in the cpu and cpuacct hierarchies",
                    cgroups.display
                )));
            }
            Ok((0..workers).map(|_| vec!["cpu".into(), "--load".into(), load_percent.to_string()]).collect())
        }
        StressFault::Memory { size, oom_target, .. } => {
            if cgroups.memory.is_none() {
                return Err(ApiError::FailedPrecondition(format!(
                    "{} is not in a memory cgroup hierarchy; target a cgroup that exists in the memory hierarchy",
                    cgroups.display
                )));
            }
            let host =
                procfs::mem_total_bytes().map_err(|e| ApiError::Internal(format!("reading /proc/meminfo: {e}")))?;
            let bytes = match size {
                MemorySize::Bytes(b) => *b,
                MemorySize::PercentOfLimit(p) => {
                    let limit = cgroups.memory_limit(&roots.cgroup, host)?;
                    (limit as f64 * p / 100.0) as u64
                }
            };
            if bytes == 0 {
                return Err(ApiError::InvalidArgument("the memory size must be more than 0 bytes".into()));
            }
            if bytes > host && !exp.forced {
                return Err(ApiError::InvalidArgument(format!(
                    "memory size {} is more than this host's memory ({}): give at most that (or a share of the \
                     target's limit, e.g. --size 90%), or pass --force to allocate it anyway",
                    human_bytes(bytes),
                    human_bytes(host)
                )));
            }
            let each = bytes / workers;
            let first = each + bytes % workers;
            Ok((0..workers)
                .map(|i| {
                    let mut a = vec!["memory".into(), "--bytes".into(), if i == 0 { first } else { each }.to_string()];
                    if *oom_target {
                        a.push("--oom-target".into());
                    }
                    a
                })
                .collect())
        }
    }
}
