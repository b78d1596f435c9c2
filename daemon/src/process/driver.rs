//! `ProcessDriver`: kill (one signal, nothing to revert) and pause
//! (SIGSTOP, SIGCONT at revert, a guardian in between).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    clients::{self, Spared},
    guardian::{self, Guardian},
    procfs::{self, ProcId},
    signal, targets,
};
use crate::{
    driver::{Applied, ApplyContext, Driver, Liveness, RecordError, Recorder, decode_records},
    error::ApiError,
    experiment::{Counters, Experiment},
    spec::{Fault, ProcessFault, Target},
    stress::cgroup::{Layout, Roots},
};

/// How long paused processes stay paused after the daemon died, when the
/// deadline is later: long enough for a restart (systemd's default
/// RestartSec plus chaosd's start-up), short enough that a crashed daemon
/// does not leave a service frozen.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// The guardian resumes this long after the deadline: the engine ends the
/// pause on time, the guardian is the backstop when it cannot.
const GUARDIAN_SLACK: Duration = Duration::from_secs(1);

/// What the process driver records in the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum ProcessObject {
    /// A process stopped with SIGSTOP (resumed at revert).
    Paused { pid: u32, start_time: u64 },
    /// A process sent the kill fault's signal.
    Signalled { pid: u32, start_time: u64 },
    /// The guardian process that resumes paused processes if chaosd dies.
    PauseGuardian { pid: u32, start_time: u64 },
    /// Written before the guardian is started (it has no pid yet).
    PauseGuardianIntent,
}

impl ProcessObject {
    fn paused(&self) -> Option<ProcId> {
        if let Self::Paused { pid, start_time } = *self { Some(ProcId { pid, start_time }) } else { None }
    }

    fn signalled(&self) -> Option<ProcId> {
        if let Self::Signalled { pid, start_time } = *self { Some(ProcId { pid, start_time }) } else { None }
    }
}

struct Pause {
    procs: Vec<ProcId>,
    guardian: Option<Guardian>,
    target_pid: Option<ProcId>,
}

pub struct ProcessDriver {
    exe: PathBuf,
    grace: Duration,
    roots: Roots,
    paused: Mutex<HashMap<String, Pause>>,
    /// Held by a pause while its guardian is not in `paused` yet, and by
    /// sweep, so that a sweep never takes that guardian for a leftover.
    applying: Mutex<()>,
}

fn decoded(objects: &[Value]) -> Result<Vec<ProcessObject>, RecordError> {
    decode_records("process", objects)
}

/// The processes of one kind of record. Where a record does not decode
/// (`decode` reports it: the engine asks before it reverts or adopts what
/// a journal left), this is best effort and finds none.
fn objects_of(objects: &[Value], pick: fn(&ProcessObject) -> Option<ProcId>) -> Vec<ProcId> {
    decoded(objects).unwrap_or_default().iter().filter_map(pick).collect()
}

fn record(rec: &mut dyn Recorder, object: ProcessObject) -> Result<(), ApiError> {
    rec.record(serde_json::to_value(object).expect("plain enum"))
}

impl ProcessDriver {
    /// `exe`: the chaosd binary the pause guardian re-executes
    /// (`/proc/self/exe` in the daemon). `grace`: how long a guardian waits
    /// after the daemon died before it resumes (`DEFAULT_GRACE`).
    pub fn new(exe: impl Into<PathBuf>, grace: Duration) -> Self {
        Self {
            exe: exe.into(),
            grace,
            roots: Roots::host(),
            paused: Mutex::new(HashMap::new()),
            applying: Mutex::new(()),
        }
    }

    fn paused(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pause>> {
        self.paused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pid of the guardian of a paused experiment (tests).
    pub fn guardian_pid(&self, id: &str) -> Option<u32> {
        self.paused().get(id).and_then(|p| p.guardian.as_ref().map(|g| g.id.pid))
    }

    /// Processes of a cgroup and its descendants.
    fn cgroup_procs(&self, path: &Path) -> Result<BTreeMap<u32, ProcId>, ApiError> {
        let layout = Layout::detect(&self.roots)?;
        let set = layout.of_path(&self.roots, path)?;
        // v1: the hierarchy the user named when absolute, else the first.
        let dir = if path.is_absolute() {
            fs::canonicalize(path)
                .map_err(|_| ApiError::NotFound(format!("cgroup {} does not exist", path.display())))?
        } else {
            set.join
                .first()
                .cloned()
                .ok_or_else(|| ApiError::NotFound(format!("cgroup {} does not exist", path.display())))?
        };
        let mut out = BTreeMap::new();
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            let text = fs::read_to_string(d.join("cgroup.procs"))
                .map_err(|e| ApiError::Internal(format!("reading {}: {e}", d.join("cgroup.procs").display())))?;
            for pid in text.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                if let Some((id, st)) = procfs::identify(pid)
                    && !st.is_kernel_thread()
                {
                    out.insert(pid, id);
                }
            }
            if let Ok(rd) = fs::read_dir(&d) {
                stack.extend(rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
            }
        }
        Ok(out)
    }

    /// The processes a fault acts on, after the refusals, and the clients
    /// of chaosd the target would have included (left out of the set).
    fn resolve(&self, target: &Target) -> Result<(BTreeMap<u32, ProcId>, Vec<Spared>), ApiError> {
        let clients = clients::connected();
        let mut set = match target {
            Target::Pid(pid) => {
                let (id, _) = targets::check_pid(*pid, "it would take the whole host down")?;
                targets::refuse_client(id, &clients)?;
                BTreeMap::from([(*pid, id)])
            }
            Target::ProcessName(name) => targets::by_name(name)?,
            Target::Cgroup(path) => {
                let set = self.cgroup_procs(path)?;
                if set.is_empty() {
                    return Err(ApiError::NotFound(format!("cgroup {} holds no process", path.display())));
                }
                set
            }
            other => {
                return Err(ApiError::InvalidArgument(format!(
                    "process faults act on --pid, --name or --cgroup, not {other}"
                )));
            }
        };
        targets::refuse_protected(&set, &format!("{target}"))?;
        let spared = targets::leave_out_clients(&mut set, &clients);
        if set.is_empty() {
            let who: Vec<String> = spared.iter().map(ToString::to_string).collect();
            return Err(ApiError::FailedPrecondition(format!(
                "every process of {target} is connected to chaosd ({}), and chaosd never signals its own clients \
                 (one of them may be what recovers the fault): nothing left to act on; target other processes",
                who.join(", ")
            )));
        }
        Ok((set, spared))
    }

    /// Signals every process of the target; returns how many were
    /// recorded (and so counted as signalled).
    fn apply_kill(&self, exp: &Experiment, sig: i32, rec: &mut dyn Recorder) -> Result<usize, ApiError> {
        let (procs, spared) = self.resolve(&exp.target)?;
        let mut sent = 0;
        let mut errors = Vec::new();
        for id in procs.values() {
            record(rec, ProcessObject::Signalled { pid: id.pid, start_time: id.start_time })?;
            match signal::signal_exact(*id, sig) {
                Ok(true) => sent += 1,
                Ok(false) => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
        if sent == 0 {
            return Err(match (errors.is_empty(), &exp.target) {
                (true, Target::Pid(pid)) => {
                    ApiError::NotFound(format!("pid {pid} exited before it could be signalled"))
                }
                (true, _) => {
                    ApiError::NotFound(format!("every process of {} exited before it could be signalled", exp.target))
                }
                (false, _) => ApiError::Internal(errors.join("; ")),
            });
        }
        report_spared(&exp.id, spared);
        Ok(procs.len())
    }

    fn apply_pause(&self, exp: &Experiment, ctx: &ApplyContext<'_>, rec: &mut dyn Recorder) -> Result<(), ApiError> {
        let (mut procs, spared) = self.resolve(&exp.target)?;
        {
            let paused = self.paused();
            let mine: HashSet<u32> = paused
                .values()
                .flat_map(|p| p.procs.iter().map(|i| i.pid).chain(p.guardian.iter().map(|g| g.id.pid)))
                .collect();
            if let Some(pid) = procs.keys().find(|p| mine.contains(p)) {
                let other = paused.iter().find(|(_, p)| p.procs.iter().any(|i| i.pid == *pid)).map(|(k, _)| k.clone());
                return Err(ApiError::AlreadyExists(format!(
                    "pid {pid} is already paused by experiment {}; recover that one first",
                    other.unwrap_or_else(|| "of chaosd (its guardian)".into())
                )));
            }
        }
        let target_pid = match exp.target {
            Target::Pid(pid) => procs.get(&pid).copied(),
            _ => None,
        };
        let _applying = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        record(rec, ProcessObject::PauseGuardianIntent)?;
        let mut g = Guardian::spawn(
            &self.exe,
            &exp.id,
            self.grace,
            ctx.duration.map(|d| std::time::SystemTime::now() + d + GUARDIAN_SLACK),
        )
        .map_err(|e| ApiError::Internal(format!("starting the pause guardian ({}): {e}", self.exe.display())))?;
        let mut pause = Pause { procs: Vec::new(), guardian: None, target_pid };
        let mut spared_late = Vec::new();
        let result = (|| -> Result<(), ApiError> {
            record(rec, ProcessObject::PauseGuardian { pid: g.id.pid, start_time: g.id.start_time })?;
            // A cgroup's processes may fork while we stop them: go round
            // until a pass finds nothing new (stopped processes cannot fork).
            for _round in 0..5 {
                for id in procs.values() {
                    if pause.procs.iter().any(|p| p.pid == id.pid) {
                        continue;
                    }
                    record(rec, ProcessObject::Paused { pid: id.pid, start_time: id.start_time })?;
                    g.add(*id).map_err(|e| {
                        ApiError::Internal(format!("telling the pause guardian about pid {}: {e}", id.pid))
                    })?;
                    match signal::stop(*id) {
                        Ok(true) => pause.procs.push(*id),
                        Ok(false) => {}
                        Err(e) => return Err(ApiError::Internal(e.to_string())),
                    }
                }
                let Target::Cgroup(path) = &exp.target else { break };
                let mut now = self.cgroup_procs(path)?;
                // A client that joined the cgroup meanwhile is spared too;
                // those already spared are not listed twice.
                for s in targets::leave_out_clients(&mut now, &clients::connected()) {
                    if !spared_late.iter().chain(&spared).any(|x| x.pid == s.pid) {
                        spared_late.push(s);
                    }
                }
                let new: Vec<u32> = now.keys().filter(|p| !pause.procs.iter().any(|x| x.pid == **p)).copied().collect();
                if new.is_empty() {
                    break;
                }
                procs = now;
            }
            // SIGSTOP takes effect when the process next runs: wait until
            // each one shows as stopped, so that "active" means paused. A
            // process in uninterruptible sleep stops only when it leaves
            // it; after a second we stop waiting (it will stop then).
            let deadline = std::time::Instant::now() + Duration::from_secs(1);
            while std::time::Instant::now() < deadline
                && pause
                    .procs
                    .iter()
                    .any(|id| procfs::stat_if_same(*id).is_some_and(|s| !s.is_stopped() && !s.is_dead()))
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            if pause.procs.is_empty() {
                return Err(match &exp.target {
                    Target::Pid(pid) => ApiError::NotFound(format!("pid {pid} exited before it could be paused")),
                    t => ApiError::NotFound(format!("every process of {t} exited before it could be paused")),
                });
            }
            Ok(())
        })();
        if let Err(e) = result {
            let mut errors: Vec<String> = Vec::new();
            for id in &pause.procs {
                if let Err(e) = signal::resume(*id) {
                    errors.push(e.to_string());
                }
            }
            if let Err(e) = g.finish() {
                errors.push(e);
            }
            return Err(if errors.is_empty() {
                e
            } else {
                ApiError::Internal(format!("{e}; and while undoing: {}", errors.join("; ")))
            });
        }
        pause.guardian = Some(g);
        self.paused().insert(exp.id.clone(), pause);
        report_spared(&exp.id, spared.into_iter().chain(spared_late).collect());
        Ok(())
    }
}

/// Logs the clients a fault left out and keeps them for the reply.
fn report_spared(exp_id: &str, spared: Vec<Spared>) {
    if spared.is_empty() {
        return;
    }
    let who: Vec<String> = spared.iter().map(ToString::to_string).collect();
    tracing::info!(id = %exp_id, spared = %who.join(", "), "left out processes connected to chaosd (its own clients)");
    clients::note_spared(exp_id, spared);
}

/// Tells guardians left by an earlier chaosd for this experiment to exit
/// without resuming (we resumed, or a new guardian watches now).
fn stand_down_old_guardians(exp_id: &str, keep: Option<u32>) {
    for (id, _, _) in guardian::find_guardians(Some(exp_id)) {
        if Some(id.pid) != keep {
            let _ = signal::signal_exact(id, Signal::SIGUSR1 as i32);
        }
    }
}

impl Driver for ProcessDriver {
    fn apply(&self, exp: &Experiment, ctx: &ApplyContext<'_>, rec: &mut dyn Recorder) -> Result<Applied, ApiError> {
        match &exp.fault {
            Fault::Process(ProcessFault::Kill { signal }) => {
                let signalled = self.apply_kill(exp, *signal, rec)?;
                // A signal is done once sent: nothing stays to recover.
                Ok(Applied::Done { reason: format!("signal sent to {signalled} process(es)") })
            }
            Fault::Process(ProcessFault::Pause) => self.apply_pause(exp, ctx, rec).map(|()| Applied::Active),
            other => {
                Err(ApiError::InvalidArgument(format!("the process driver cannot apply a {} fault", other.name())))
            }
        }
    }

    fn decode(&self, objects: &[Value]) -> Result<(), RecordError> {
        decoded(objects).map(drop)
    }

    fn revert(&self, exp: &Experiment, objects: &[Value]) -> Result<(), Vec<String>> {
        decoded(objects).map_err(|e| vec![format!("{e}; nothing of {} was resumed", exp.id)])?;
        if !matches!(exp.fault, Fault::Process(ProcessFault::Pause)) {
            // A signal cannot be taken back.
            return Ok(());
        }
        let mut errors = Vec::new();
        let pause = self.paused().remove(&exp.id);
        let mut procs = objects_of(objects, ProcessObject::paused);
        if let Some(p) = &pause {
            procs.extend(p.procs.iter().filter(|i| !procs.contains(i)).copied().collect::<Vec<_>>());
        }
        for id in &procs {
            // Gone or reused: nothing to resume, not an error.
            if let Err(e) = signal::resume(*id) {
                errors.push(e.to_string());
            }
        }
        if let Some(g) = pause.and_then(|p| p.guardian)
            && let Err(e) = g.finish()
        {
            errors.push(e);
        }
        stand_down_old_guardians(&exp.id, None);
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    fn counters(&self, _exp: &Experiment, objects: &[Value]) -> Counters {
        let n = objects_of(objects, ProcessObject::paused).len() + objects_of(objects, ProcessObject::signalled).len();
        Counters { processes_signalled: n as u32, ..Counters::default() }
    }

    fn liveness(&self, exp: &Experiment, objects: &[Value]) -> Liveness {
        let alive = match self.paused().get(&exp.id).and_then(|p| p.target_pid) {
            Some(id) => procfs::is_alive(id),
            None => objects_of(objects, ProcessObject::paused).into_iter().any(procfs::is_alive),
        };
        if alive { Liveness::Alive } else { Liveness::Gone }
    }

    /// A pause found in the journal after a restart is still due: while
    /// its processes are still stopped it goes on until its deadline (the
    /// journal is the contract, as for network faults), a new guardian
    /// watches this daemon and the old one is told to stand down. When the
    /// old guardian already resumed them (the daemon was down longer than
    /// the grace period) the pause is over and the engine reverts it.
    fn adopt(&self, exp: &Experiment, objects: &[Value]) -> Result<(), ApiError> {
        if !matches!(exp.fault, Fault::Process(ProcessFault::Pause)) {
            return Ok(());
        }
        let still: Vec<ProcId> = objects_of(objects, ProcessObject::paused)
            .into_iter()
            .filter(|id| procfs::stat_if_same(*id).is_some_and(|s| s.is_stopped()))
            .collect();
        if still.is_empty() {
            return Err(ApiError::FailedPrecondition(format!(
                "the processes paused by experiment {} are no longer stopped (resumed by its guardian after chaosd stopped, or by someone else)",
                exp.id
            )));
        }
        let _applying = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        let mut g = Guardian::spawn(&self.exe, &exp.id, self.grace, exp.ends_at.map(|t| t + GUARDIAN_SLACK))
            .map_err(|e| ApiError::Internal(format!("starting the pause guardian ({}): {e}", self.exe.display())))?;
        for id in &still {
            if let Err(e) = g.add(*id) {
                let _ = g.finish();
                return Err(ApiError::Internal(format!("telling the pause guardian about pid {}: {e}", id.pid)));
            }
        }
        stand_down_old_guardians(&exp.id, Some(g.id.pid));
        let target_pid = match exp.target {
            Target::Pid(pid) => still.iter().find(|i| i.pid == pid).copied(),
            _ => None,
        };
        self.paused().insert(exp.id.clone(), Pause { procs: still, guardian: Some(g), target_pid });
        Ok(())
    }

    /// Guardians nobody will ever talk to again (their daemon is gone, or
    /// it is this daemon and the experiment is not ours) of experiments
    /// that are not active are told to resume their processes now and exit.
    fn sweep(&self, known: &[(Experiment, Vec<Value>)]) -> Vec<String> {
        let _applying = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        // Guardians of experiments still running were adopted (and the old
        // guardian told to stand down) or are reverted by the engine.
        let active: HashSet<&str> =
            known.iter().filter(|(e, _)| !e.state.is_terminal()).map(|(e, _)| e.id.as_str()).collect();
        let ours: HashSet<u32> = self.paused().values().filter_map(|p| p.guardian.as_ref().map(|g| g.id.pid)).collect();
        let me = std::process::id();
        let mut out = Vec::new();
        for (id, exp, daemon) in guardian::find_guardians(None) {
            if ours.contains(&id.pid) || active.contains(exp.as_str()) {
                continue;
            }
            let daemon_alive = daemon.is_some_and(|d| d != me && procfs::identify(d).is_some());
            if daemon_alive {
                continue;
            }
            if signal::signal_exact(id, Signal::SIGTERM as i32).unwrap_or(false) {
                out.push(format!(
                    "told leftover pause guardian pid {} of experiment {exp} to resume its processes",
                    id.pid
                ));
            }
        }
        out
    }

    fn tick(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (id, p) in self.paused().iter_mut() {
            // The guardian's deadline is later than the engine's, so a
            // guardian that exited was killed: the processes are still
            // stopped but no longer guarded, and the engine should end the
            // pause (and resume them) now.
            if let Some(g) = p.guardian.as_mut()
                && g.exited()
            {
                let pid = g.id.pid;
                p.guardian = None;
                out.push((
                    id.clone(),
                    format!("the pause guardian (pid {pid}) exited unexpectedly; the pause was ended to be safe"),
                ));
            }
        }
        out
    }
}
