//! `StressDriver`: the `Driver` for CPU and memory stress.

use std::{
    collections::{HashMap, HashSet},
    io::Write as _,
    os::unix::process::{CommandExt, ExitStatusExt},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    cgroup::{CgroupSet, Layout, Roots},
    plan,
    spawner::Spawner,
    worker::STRESSOR_COMM,
};
use crate::{
    driver::{Applied, ApplyContext, Driver, Liveness, RecordError, Recorder, decode_records},
    error::ApiError,
    experiment::{Counters, Experiment},
    process::{
        procfs::{self, ProcId},
        signal,
    },
    spec::{Fault, StressFault, Target},
};

/// What the stress driver records in the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum StressObject {
    /// Written before worker `worker` is started (it has no pid yet).
    StressorIntent { worker: u32 },
    /// A stressor, journalled once it was spawned.
    Stressor { worker: u32, pid: u32, start_time: u64 },
}

fn decoded(objects: &[Value]) -> Result<Vec<StressObject>, RecordError> {
    decode_records("stress", objects)
}

struct Stressor {
    id: ProcId,
    /// None when adopted from a previous process image (not reapable).
    child: Option<Child>,
    /// Last CPU time read, kept after the stressor is gone.
    cpu_ns: u64,
    rss_bytes: u64,
    exited: Option<ExitStatus>,
}

struct Run {
    stressors: Vec<Stressor>,
    cgroups: CgroupSet,
    /// OOM kills in the cgroup when the memory stress started.
    oom_base: Option<u64>,
    target_pid: Option<ProcId>,
    /// The end was reported by `tick`.
    ended: bool,
}

pub struct StressDriver {
    exe: PathBuf,
    roots: Roots,
    spawner: Spawner,
    runs: Mutex<HashMap<String, Run>>,
    /// Held by apply while stressors exist that are not in `runs` yet, and
    /// by sweep, so that a sweep never takes them for leftovers.
    applying: Mutex<()>,
}

impl StressDriver {
    /// `exe`: the chaosd binary the stressors re-execute (the daemon passes
    /// `/proc/self/exe`, tests the built `chaosd`).
    pub fn new(exe: impl Into<PathBuf>) -> Result<Self, ApiError> {
        Self::with_roots(exe, Roots::host())
    }

    pub fn with_roots(exe: impl Into<PathBuf>, roots: Roots) -> Result<Self, ApiError> {
        let spawner =
            Spawner::new().map_err(|e| ApiError::Internal(format!("starting the stressor spawner thread: {e}")))?;
        Ok(Self { exe: exe.into(), roots, spawner, runs: Mutex::new(HashMap::new()), applying: Mutex::new(()) })
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Run>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pids of the live stressors of an experiment (for tests and status).
    pub fn stressor_pids(&self, id: &str) -> Vec<u32> {
        self.runs()
            .get(id)
            .map(|r| r.stressors.iter().filter(|s| s.exited.is_none()).map(|s| s.id.pid).collect())
            .unwrap_or_default()
    }

    fn command(&self, exp_id: &str, mode: &[String], go: std::io::PipeReader) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.arg0(STRESSOR_COMM)
            .args(["stressor", "--experiment", exp_id, "--parent", &std::process::id().to_string()])
            .args(mode)
            .stdin(Stdio::from(go))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Its own process group: a Ctrl-C meant for a foreground daemon
            // does not reach the stressors behind its back.
            .process_group(0);
        cmd
    }

    /// Spawns, records and places every worker, then releases them all.
    fn start(
        &self,
        exp: &Experiment,
        plan: &[Vec<String>],
        cgroups: &CgroupSet,
        rec: &mut dyn Recorder,
        started: &mut Vec<Stressor>,
    ) -> Result<(), ApiError> {
        let mut gates = Vec::with_capacity(plan.len());
        for (i, mode) in plan.iter().enumerate() {
            rec.record(serde_json::to_value(StressObject::StressorIntent { worker: i as u32 }).expect("plain enum"))?;
            let (r, w) = std::io::pipe().map_err(|e| ApiError::Internal(format!("pipe for a stressor: {e}")))?;
            let child = self
                .spawner
                .spawn(self.command(&exp.id, mode, r))
                .map_err(|e| ApiError::Internal(format!("starting stressor {} ({}): {e}", i, self.exe.display())))?;
            let pid = child.id();
            let start_time = procfs::stat(pid).map(|s| s.start_time).unwrap_or(0);
            started.push(Stressor {
                id: ProcId { pid, start_time },
                child: Some(child),
                cpu_ns: 0,
                rss_bytes: 0,
                exited: None,
            });
            gates.push(w);
            rec.record(
                serde_json::to_value(StressObject::Stressor { worker: i as u32, pid, start_time }).expect("plain enum"),
            )?;
            cgroups.join(pid)?;
            // Highest score by default: when the target's limit is hit, the
            // kernel kills a stressor, not the service under test. 0 leaves
            // the choice to the kernel (and undoes a negative score the
            // daemon may have). Set here, before release, not by the
            // stressor, so it holds from its first allocation.
            let adj = if mode.iter().any(|a| a == "--oom-target") { "0" } else { "1000" };
            std::fs::write(format!("/proc/{pid}/oom_score_adj"), adj)
                .map_err(|e| ApiError::Internal(format!("writing {adj} to /proc/{pid}/oom_score_adj: {e}")))?;
        }
        for (gate, s) in gates.iter_mut().zip(started.iter()) {
            gate.write_all(b"g")
                .map_err(|e| ApiError::Internal(format!("releasing stressor pid {}: {e}", s.id.pid)))?;
        }
        drop(gates);
        // A stressor that cannot run (mmap refused, bad binary) exits at
        // once: catch it here rather than report an active fault.
        thread::sleep(Duration::from_millis(30));
        for s in started.iter_mut() {
            if let Some(status) = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                s.exited = Some(status);
                return Err(ApiError::Internal(format!(
                    "stressor pid {} exited at start ({status}); see chaosd's log",
                    s.id.pid
                )));
            }
        }
        Ok(())
    }
}

/// SIGKILL and reap our own children; for others (from the journal, after
/// a restart), SIGKILL if still the same process and wait until it is gone.
fn kill_stressors(stressors: &mut [Stressor], errors: &mut Vec<String>) {
    for s in stressors.iter_mut() {
        if let Some(child) = s.child.as_mut() {
            if s.exited.is_none() {
                // Already exited and reaped elsewhere: kill reports an error we
                // do not care about; wait below settles it.
                let _ = child.kill();
                match child.wait() {
                    Ok(st) => s.exited = Some(st),
                    Err(e) => errors.push(format!("waiting for stressor pid {}: {e}", s.id.pid)),
                }
            }
        } else if procfs::is_alive(s.id)
            && let Err(e) = signal::signal_exact(s.id, Signal::SIGKILL as i32)
        {
            errors.push(format!("SIGKILL of stressor: {e}"));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    for s in stressors.iter().filter(|s| s.child.is_none()) {
        while procfs::is_alive(s.id) {
            if Instant::now() > deadline {
                errors.push(format!("stressor pid {} still alive 2 s after SIGKILL", s.id.pid));
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The recorded stressors. Where a record does not decode (`decode`
/// reports it: the engine asks before it reverts or adopts what a journal
/// left), this is best effort and finds none.
fn recorded(objects: &[Value]) -> Vec<ProcId> {
    decoded(objects)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|o| match o {
            StressObject::Stressor { pid, start_time, .. } => Some(ProcId { pid, start_time }),
            StressObject::StressorIntent { .. } => None,
        })
        .collect()
}

fn refresh(s: &mut Stressor) {
    if s.exited.is_some() {
        return;
    }
    if let Some(st) = procfs::stat_if_same(s.id) {
        s.cpu_ns = s.cpu_ns.max(procfs::cpu_time_ns(&st));
        s.rss_bytes = if st.is_dead() { 0 } else { procfs::rss_anon_bytes(s.id.pid).unwrap_or(0) };
    } else {
        s.rss_bytes = 0;
    }
}

fn describe_exit(pid: u32, status: ExitStatus, oom_delta: Option<u64>, cgroups: &CgroupSet) -> String {
    match (status.signal(), oom_delta) {
        (Some(9), Some(n)) if n > 0 => format!(
            "OOM kill: stressor pid {pid} was killed by the OOM killer ({n} oom_kill in {} since the start); the memory stress ended",
            cgroups.display
        ),
        (Some(sig), _) => format!("stressor pid {pid} was killed by signal {sig}; the stress ended"),
        (None, _) => format!("stressor pid {pid} exited ({status}); the stress ended"),
    }
}

impl Driver for StressDriver {
    fn apply(&self, exp: &Experiment, _ctx: &ApplyContext<'_>, rec: &mut dyn Recorder) -> Result<Applied, ApiError> {
        let Fault::Stress(fault) = &exp.fault else {
            return Err(ApiError::InvalidArgument(format!(
                "the stress driver cannot apply a {} fault",
                exp.fault.name()
            )));
        };
        let (cgroups, target_pid) = plan::target_cgroups(&self.roots, &exp.target)?;
        let plan = plan::plan(&self.roots, exp, fault, &cgroups)?;
        let oom_base = match fault {
            StressFault::Memory { .. } => Some(cgroups.oom_kills(&self.roots.proc)?),
            StressFault::Cpu { .. } => None,
        };
        let _applying = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        let mut started = Vec::new();
        if let Err(e) = self.start(exp, &plan, &cgroups, rec, &mut started) {
            let mut errors = Vec::new();
            kill_stressors(&mut started, &mut errors);
            return Err(match errors.is_empty() {
                true => e,
                false => {
                    ApiError::Internal(format!("{e}; and while removing the stressors again: {}", errors.join("; ")))
                }
            });
        }
        self.runs().insert(exp.id.clone(), Run { stressors: started, cgroups, oom_base, target_pid, ended: false });
        Ok(Applied::Active)
    }

    fn decode(&self, objects: &[Value]) -> Result<(), RecordError> {
        decoded(objects).map(drop)
    }

    fn revert(&self, exp: &Experiment, objects: &[Value]) -> Result<(), Vec<String>> {
        decoded(objects).map_err(|e| vec![format!("{e}; no stressor of {} was stopped", exp.id)])?;
        let mut stressors = self.runs().remove(&exp.id).map(|r| r.stressors).unwrap_or_default();
        let known: HashSet<u32> = stressors.iter().map(|s| s.id.pid).collect();
        for id in recorded(objects) {
            if !known.contains(&id.pid) {
                stressors.push(Stressor { id, child: None, cpu_ns: 0, rss_bytes: 0, exited: None });
            }
        }
        let mut errors = Vec::new();
        kill_stressors(&mut stressors, &mut errors);
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    fn counters(&self, exp: &Experiment, objects: &[Value]) -> Counters {
        let mut runs = self.runs();
        let mut c = Counters::default();
        match runs.get_mut(&exp.id) {
            Some(run) => {
                for s in run.stressors.iter_mut() {
                    refresh(s);
                    c.stress_cpu_time_ns += s.cpu_ns;
                    c.stress_resident_bytes += s.rss_bytes;
                }
                if let Some(base) = run.oom_base {
                    c.oom_kills = run.cgroups.oom_kills(&self.roots.proc).map(|n| n.saturating_sub(base)).unwrap_or(0);
                }
            }
            None => {
                for id in recorded(objects) {
                    if let Some(st) = procfs::stat_if_same(id).filter(|s| !s.is_dead()) {
                        c.stress_cpu_time_ns += procfs::cpu_time_ns(&st);
                        c.stress_resident_bytes += procfs::rss_anon_bytes(id.pid).unwrap_or(0);
                    }
                }
            }
        }
        c.stress_cpu_time_ns = c.stress_cpu_time_ns.max(exp.counters.stress_cpu_time_ns);
        c.oom_kills = c.oom_kills.max(exp.counters.oom_kills);
        c
    }

    fn liveness(&self, exp: &Experiment, _objects: &[Value]) -> Liveness {
        let alive = match &exp.target {
            Target::Pid(pid) => match self.runs().get(&exp.id).and_then(|r| r.target_pid) {
                Some(id) => procfs::is_alive(id),
                None => procfs::identify(*pid).is_some(),
            },
            Target::Cgroup(path) => Layout::detect(&self.roots).and_then(|l| l.of_path(&self.roots, path)).is_ok(),
            _ => true,
        };
        if alive { Liveness::Alive } else { Liveness::Gone }
    }

    /// Stressors die with the daemon (PR_SET_PDEATHSIG), so after a restart
    /// they are normally gone and the experiment is not resumed: the fault
    /// visibly stopped when chaosd stopped, which is what an operator who
    /// restarts chaosd to stop chaos expects, and re-starting load nobody
    /// asked for again would surprise them. They are taken over only in
    /// the unusual case that every recorded stressor is still running.
    fn adopt(&self, exp: &Experiment, objects: &[Value]) -> Result<(), ApiError> {
        let ids = recorded(objects);
        let gone: Vec<String> = ids.iter().filter(|id| !procfs::is_alive(**id)).map(|id| id.pid.to_string()).collect();
        if ids.is_empty() || !gone.is_empty() {
            return Err(ApiError::FailedPrecondition(format!(
                "the stressors of experiment {} (pids {}) ended with the previous chaosd process, as stressors do \
                 (PR_SET_PDEATHSIG); inject the stress again to continue",
                exp.id,
                if gone.is_empty() { "none recorded".into() } else { gone.join(", ") }
            )));
        }
        let Fault::Stress(fault) = &exp.fault else {
            return Err(ApiError::InvalidArgument(format!(
                "the stress driver cannot adopt a {} fault",
                exp.fault.name()
            )));
        };
        let (cgroups, target_pid) = plan::target_cgroups(&self.roots, &exp.target)?;
        let oom_base = match fault {
            StressFault::Memory { .. } => {
                Some(cgroups.oom_kills(&self.roots.proc)?.saturating_sub(exp.counters.oom_kills))
            }
            StressFault::Cpu { .. } => None,
        };
        let stressors =
            ids.into_iter().map(|id| Stressor { id, child: None, cpu_ns: 0, rss_bytes: 0, exited: None }).collect();
        self.runs().insert(exp.id.clone(), Run { stressors, cgroups, oom_base, target_pid, ended: false });
        Ok(())
    }

    /// Kills stressors that carry the mark (comm chaosd-stressor, `stressor
    /// --experiment ID` in argv) and that nobody can release or kill any
    /// more: not ours, and either orphaned (the daemon named in their
    /// `--parent` is no longer their parent) or left over by this daemon.
    /// Stressors of another live chaosd are left to it.
    fn sweep(&self, known: &[(Experiment, Vec<Value>)]) -> Vec<String> {
        let _ = known;
        let _applying = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        let ours: HashSet<u32> = self.runs().values().flat_map(|r| r.stressors.iter().map(|s| s.id.pid)).collect();
        let me = std::process::id();
        let mut removed = Vec::new();
        for pid in procfs::all_pids().unwrap_or_default() {
            if ours.contains(&pid) {
                continue;
            }
            let Some((id, st)) = procfs::identify(pid) else { continue };
            // argv[0] is set by exec, comm once the stressor renamed itself.
            let argv = procfs::cmdline(pid).unwrap_or_default();
            let marked = st.comm == STRESSOR_COMM || argv.first().is_some_and(|a| a == STRESSOR_COMM);
            if !marked || !argv.iter().any(|a| a == "stressor") {
                continue;
            }
            let arg = |name: &str| argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1)).cloned();
            let parent: Option<u32> = arg("--parent").and_then(|p| p.parse().ok());
            let orphaned = parent != Some(st.ppid);
            if !(orphaned || parent == Some(me)) {
                continue;
            }
            if signal::signal_exact(id, Signal::SIGKILL as i32).unwrap_or(false) {
                removed.push(format!(
                    "killed leftover stressor pid {pid} of experiment {}",
                    arg("--experiment").unwrap_or_else(|| "?".into())
                ));
            }
        }
        removed
    }

    fn tick(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (id, run) in self.runs().iter_mut() {
            let mut first_exit = None;
            for s in run.stressors.iter_mut() {
                refresh(s);
                if s.exited.is_some() {
                    continue;
                }
                if let Some(status) = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    s.exited = Some(status);
                    s.rss_bytes = 0;
                    first_exit.get_or_insert((s.id.pid, status));
                } else if s.child.is_none() && !procfs::is_alive(s.id) {
                    s.exited = Some(ExitStatus::from_raw(0));
                    first_exit.get_or_insert((s.id.pid, ExitStatus::from_raw(0)));
                }
            }
            if run.ended {
                continue;
            }
            if let Some((pid, status)) = first_exit {
                let delta = run
                    .oom_base
                    .map(|base| run.cgroups.oom_kills(&self.roots.proc).map(|n| n.saturating_sub(base)).unwrap_or(0));
                run.ended = true;
                out.push((id.clone(), describe_exit(pid, status, delta, &run.cgroups)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> CgroupSet {
        CgroupSet {
            version: super::super::cgroup::Version::V2,
            join: vec![],
            cpu: None,
            memory: None,
            is_root: false,
            display: "cgroup /sys/fs/cgroup/app".into(),
        }
    }

    #[test]
    fn a_sigkill_with_a_new_oom_kill_is_an_oom_kill() {
        let why = describe_exit(7, ExitStatus::from_raw(9), Some(1), &set());
        assert!(why.starts_with("OOM kill: stressor pid 7"), "{why}");
        assert!(why.contains("cgroup /sys/fs/cgroup/app"), "{why}");
    }

    #[test]
    fn a_sigkill_without_an_oom_kill_is_not() {
        assert_eq!(
            describe_exit(7, ExitStatus::from_raw(9), Some(0), &set()),
            "stressor pid 7 was killed by signal 9; the stress ended"
        );
        // A CPU stress has no OOM baseline.
        assert!(describe_exit(7, ExitStatus::from_raw(9), None, &set()).contains("signal 9"));
        assert!(describe_exit(7, ExitStatus::from_raw(1 << 8), None, &set()).contains("exited (exit status: 1)"));
    }
}
