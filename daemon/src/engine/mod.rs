//! The engine: owns experiments, the journal and the drivers. Synchronous;
//! the gRPC service calls it from blocking threads. Requests are serialised
//! per target (not globally), the journal is written before a driver touches
//! the kernel, and a background ticker ends experiments on time, notices
//! targets that went away and refreshes the drivers (BPF heartbeat).
//! Which driver runs a fault is all it knows of fault kinds: a driver's
//! `apply` says whether the experiment stays active or is already over.

mod reconcile;
#[cfg(test)]
mod tests;

pub use reconcile::Reconciled;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;
use tokio::sync::broadcast;

use crate::{
    driver::{Applied, ApplyContext, Driver, Liveness, Recorder},
    error::ApiError,
    experiment::{Experiment, State},
    journal::Journal,
    spec::{Fault, Target},
};

/// Which driver carries out a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DriverKind {
    Network,
    Stress,
    Process,
}

impl DriverKind {
    pub fn of(f: &Fault) -> Self {
        match f {
            Fault::Network(_) => DriverKind::Network,
            Fault::Stress(_) => DriverKind::Stress,
            Fault::Process(_) => DriverKind::Process,
        }
    }
}

/// A driver, or why there is none on this host.
pub enum Slot {
    Ready(Box<dyn Driver>),
    Unavailable(String),
}

pub struct Drivers {
    pub network: Slot,
    pub stress: Slot,
    pub process: Slot,
}

impl Drivers {
    fn get(&self, kind: DriverKind) -> Result<&dyn Driver, ApiError> {
        let slot = match kind {
            DriverKind::Network => &self.network,
            DriverKind::Stress => &self.stress,
            DriverKind::Process => &self.process,
        };
        match slot {
            Slot::Ready(d) => Ok(d.as_ref()),
            Slot::Unavailable(why) => Err(ApiError::Unavailable(why.clone())),
        }
    }

    fn all(&self) -> impl Iterator<Item = (DriverKind, &dyn Driver)> {
        [(DriverKind::Network, &self.network), (DriverKind::Stress, &self.stress), (DriverKind::Process, &self.process)]
            .into_iter()
            .filter_map(|(k, s)| match s {
                Slot::Ready(d) => Some((k, d.as_ref())),
                Slot::Unavailable(_) => None,
            })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    StateChanged,
    Counters,
}

#[derive(Clone, Debug)]
pub struct Event {
    pub at: SystemTime,
    pub kind: EventKind,
    pub experiment: Experiment,
}

/// A request to start an experiment (already validated).
pub struct InjectSpec {
    pub target: Target,
    pub fault: Fault,
    pub duration: Option<Duration>,
    pub force: bool,
}

struct Live {
    exp: Experiment,
    objects: Vec<Value>,
}

pub struct Engine {
    journal: Mutex<Journal>,
    live: Mutex<HashMap<String, Live>>,
    drivers: Drivers,
    events: broadcast::Sender<Event>,
    target_locks: Mutex<HashMap<Target, Arc<Mutex<()>>>>,
    closing: AtomicBool,
}

struct JournalRecorder<'a> {
    engine: &'a Engine,
    id: String,
    objects: Vec<Value>,
}

impl Recorder for JournalRecorder<'_> {
    fn record(&mut self, object: Value) -> Result<(), ApiError> {
        self.record_all(vec![object])
    }

    fn record_all(&mut self, objects: Vec<Value>) -> Result<(), ApiError> {
        self.engine
            .journal()
            .add_objects(&self.id, &objects)
            .map_err(|e| ApiError::Internal(format!("cannot write the journal, nothing more is applied: {e}")))?;
        self.objects.extend(objects);
        Ok(())
    }
}

fn new_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another request must not wedge the daemon: the data under
    // these locks stays consistent between statements.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    pub fn new(journal: Journal, drivers: Drivers) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            journal: Mutex::new(journal),
            live: Mutex::new(HashMap::new()),
            drivers,
            events,
            target_locks: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
        }
    }

    fn journal(&self) -> MutexGuard<'_, Journal> {
        lock(&self.journal)
    }

    fn target_lock(&self, t: &Target) -> Arc<Mutex<()>> {
        lock(&self.target_locks).entry(t.clone()).or_default().clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn emit(&self, kind: EventKind, exp: &Experiment) {
        let _ = self.events.send(Event { at: SystemTime::now(), kind, experiment: exp.clone() });
    }

    fn save(&self, exp: &Experiment) {
        if let Err(e) = self.journal().update(exp) {
            tracing::error!(id = %exp.id, error = %e, "journal update failed");
        }
        self.emit(EventKind::StateChanged, exp);
    }

    pub fn active_count(&self) -> usize {
        lock(&self.live).len()
    }

    /// Starts an experiment; returns it active, or an error with nothing applied.
    pub fn inject(&self, spec: InjectSpec) -> Result<Experiment, ApiError> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(ApiError::Unavailable("chaosd is shutting down".into()));
        }
        let started = Instant::now();
        let kind = DriverKind::of(&spec.fault);
        let driver = self.drivers.get(kind)?;
        let target_lock = self.target_lock(&spec.target);
        let _serialised = lock(&target_lock);

        let mut exp = Experiment::new(new_id(), spec.target, spec.fault, spec.duration, spec.force, SystemTime::now());
        // The intent goes to the journal before the kernel is touched; it is
        // announced (Watch) only once it is an experiment, not a refusal.
        self.journal()
            .insert(&exp)
            .map_err(|e| ApiError::Internal(format!("cannot write the journal, nothing applied: {e}")))?;

        let active: Vec<Experiment> =
            lock(&self.live).values().filter(|l| DriverKind::of(&l.exp.fault) == kind).map(|l| l.exp.clone()).collect();
        let ctx = ApplyContext { active: &active, duration: exp.duration };
        let mut rec = JournalRecorder { engine: self, id: exp.id.clone(), objects: Vec::new() };
        let applied = driver.apply(&exp, &ctx, &mut rec);
        let objects = rec.objects;

        match applied {
            Ok(Applied::Done { reason }) => {
                exp.ends_at = exp.duration.map(|d| SystemTime::now() + d);
                exp.counters = driver.counters(&exp, &objects);
                exp.state = State::Expired;
                exp.ended_at = Some(SystemTime::now());
                exp.reason = reason;
                self.save(&exp);
                Ok(exp)
            }
            Ok(Applied::Active) => {
                // The fault lasts its duration from the moment it is in
                // effect: an apply that took seconds (BPF verification on a
                // slow host) must not shorten it.
                exp.ends_at = exp.duration.map(|d| SystemTime::now() + d);
                exp.counters = driver.counters(&exp, &objects);
                exp.state = State::Active;
                self.save(&exp);
                lock(&self.live).insert(exp.id.clone(), Live { exp: exp.clone(), objects });
                let elapsed_us = started.elapsed().as_micros() as u64;
                tracing::info!(id = %exp.id, summary = %crate::display::summary(&exp), elapsed_us, "injected");
                Ok(exp)
            }
            Err(e) => {
                // The driver promises all-or-nothing; revert what was recorded
                // anyway so a driver bug cannot leave a half-applied fault.
                let rolled_back = objects.is_empty()
                    || match driver.revert(&exp, &objects) {
                        Ok(()) => true,
                        Err(errs) => {
                            tracing::error!(id = %exp.id, errors = ?errs, "rollback after a failed injection was incomplete");
                            false
                        }
                    };
                // A refusal (bad request, conflict, missing target) that left
                // nothing behind is not an experiment: it is forgotten, so
                // `list --all` shows only what ran. A failure of the kernel
                // or the journal is kept, with its reason.
                if rolled_back && e.is_refusal() {
                    if let Err(je) = self.journal().forget(&exp.id) {
                        tracing::warn!(id = %exp.id, error = %je, "could not remove a refused request from the journal");
                    }
                    return Err(e);
                }
                exp.state = State::Failed;
                exp.reason = e.to_string();
                exp.ended_at = Some(SystemTime::now());
                self.save(&exp);
                Err(e)
            }
        }
    }

    /// Ends an active experiment and returns it in its final state.
    pub fn recover(&self, id: &str) -> Result<Experiment, ApiError> {
        self.finish(id, State::Recovered, "recovered on request".into())
    }

    pub fn recover_all(&self, reason: &str) -> (Vec<Experiment>, Vec<ApiError>) {
        let ids: Vec<String> = lock(&self.live).keys().cloned().collect();
        let mut done = Vec::new();
        let mut errors = Vec::new();
        for id in ids {
            match self.finish(&id, State::Recovered, reason.to_string()) {
                Ok(e) => done.push(e),
                // Ended meanwhile by the ticker: not an error for "all".
                Err(ApiError::FailedPrecondition(_)) | Err(ApiError::NotFound(_)) => {}
                Err(e) => errors.push(e),
            }
        }
        (done, errors)
    }

    fn finish(&self, id: &str, end_state: State, reason: String) -> Result<Experiment, ApiError> {
        let started = Instant::now();
        let target = match lock(&self.live).get(id) {
            Some(l) => l.exp.target.clone(),
            None => return Err(self.not_active(id)),
        };
        let target_lock = self.target_lock(&target);
        let _serialised = lock(&target_lock);
        // Someone else may have finished it while we waited for the lock.
        let Some(Live { mut exp, objects }) = lock(&self.live).remove(id) else {
            return Err(self.not_active(id));
        };
        let driver = self.drivers.get(DriverKind::of(&exp.fault))?;
        exp.state = State::Recovering;
        self.save(&exp);
        exp.counters = driver.counters(&exp, &objects);
        let result = driver.revert(&exp, &objects);
        exp.ended_at = Some(SystemTime::now());
        match result {
            Ok(()) => {
                exp.state = end_state;
                exp.reason = reason;
                self.save(&exp);
                let elapsed_us = started.elapsed().as_micros() as u64;
                tracing::info!(id = %exp.id, state = ?exp.state, reason = %exp.reason, elapsed_us, "ended");
                Ok(exp)
            }
            Err(errs) => {
                let msg = format!("recovery incomplete, left in the kernel: {}", errs.join("; "));
                exp.state = State::Failed;
                exp.reason = msg.clone();
                self.save(&exp);
                Err(ApiError::Internal(format!("experiment {id}: {msg}")))
            }
        }
    }

    fn not_active(&self, id: &str) -> ApiError {
        match self.journal().get(id) {
            Ok(Some(e)) if e.state.is_terminal() => ApiError::FailedPrecondition(format!(
                "experiment {id} already ended ({}{})",
                e.state.name(),
                if e.reason.is_empty() { String::new() } else { format!(": {}", e.reason) }
            )),
            _ => ApiError::NotFound(format!("no experiment with id '{id}' (`chaosctl list` shows the active ones)")),
        }
    }

    /// Active experiments with fresh counters, newest first; with
    /// `include_ended`, also those the journal keeps.
    pub fn list(&self, include_ended: bool) -> Result<Vec<Experiment>, ApiError> {
        let mut live: Vec<Experiment> = self.live_with_counters();
        live.sort_by_key(|e| std::cmp::Reverse(e.created_at));
        if include_ended {
            let ended = self.journal().list(true).map_err(|e| ApiError::Internal(e.to_string()))?;
            live.extend(ended.into_iter().filter(|e| e.state.is_terminal()));
            live.sort_by_key(|e| std::cmp::Reverse(e.created_at));
        }
        Ok(live)
    }

    fn live_with_counters(&self) -> Vec<Experiment> {
        let snapshot: Vec<(Experiment, Vec<Value>)> =
            lock(&self.live).values().map(|l| (l.exp.clone(), l.objects.clone())).collect();
        snapshot
            .into_iter()
            .map(|(mut e, objects)| {
                if let Ok(d) = self.drivers.get(DriverKind::of(&e.fault)) {
                    e.counters = d.counters(&e, &objects);
                }
                e
            })
            .collect()
    }

    pub fn get(&self, id: &str) -> Result<Experiment, ApiError> {
        let live = lock(&self.live).get(id).map(|l| (l.exp.clone(), l.objects.clone()));
        if let Some((mut e, objects)) = live {
            if let Ok(d) = self.drivers.get(DriverKind::of(&e.fault)) {
                e.counters = d.counters(&e, &objects);
            }
            return Ok(e);
        }
        self.journal().get(id).map_err(|e| ApiError::Internal(e.to_string()))?.ok_or_else(|| {
            ApiError::NotFound(format!("no experiment with id '{id}' (`chaosctl list --all` shows recent ones)"))
        })
    }

    /// One pass of periodic work: driver ticks, expiry, vanished targets.
    /// `check_liveness` is set about once a second.
    pub fn tick(&self, check_liveness: bool) {
        for (kind, driver) in self.drivers.all() {
            let active: Vec<Experiment> = lock(&self.live)
                .values()
                .filter(|l| DriverKind::of(&l.exp.fault) == kind)
                .map(|l| l.exp.clone())
                .collect();
            for (id, reason) in driver.ended_by_kernel(&active) {
                tracing::warn!(%id, %reason, "fault ended by the kernel");
                let _ = self.finish(&id, State::Failed, reason);
            }
        }
        for (_, driver) in self.drivers.all() {
            for (id, reason) in driver.tick() {
                let _ = self.finish(&id, State::Failed, reason);
            }
        }
        let now = SystemTime::now();
        let due: Vec<String> = lock(&self.live)
            .values()
            .filter(|l| l.exp.ends_at.is_some_and(|end| end <= now))
            .map(|l| l.exp.id.clone())
            .collect();
        for id in due {
            let _ = self.finish(&id, State::Expired, "duration elapsed".into());
        }
        if check_liveness {
            let snapshot: Vec<(Experiment, Vec<Value>)> =
                lock(&self.live).values().map(|l| (l.exp.clone(), l.objects.clone())).collect();
            for (exp, objects) in snapshot {
                let Ok(driver) = self.drivers.get(DriverKind::of(&exp.fault)) else { continue };
                if driver.liveness(&exp, &objects) == Liveness::Gone {
                    let _ = self.finish(&exp.id, State::Failed, format!("target gone: {}", exp.target));
                } else if let Err(missing) = driver.verify(&exp, &objects) {
                    // Ended meanwhile (recovered, expired): nothing to report.
                    if !lock(&self.live).contains_key(&exp.id) {
                        continue;
                    }
                    tracing::warn!(id = %exp.id, %missing, "fault no longer in force");
                    let _ = self.finish(&exp.id, State::Failed, format!("no longer in force: {missing}"));
                }
            }
        }
    }

    /// Emits counter events for active experiments (for `Watch`).
    pub fn publish_counters(&self) {
        if self.events.receiver_count() == 0 {
            return;
        }
        for e in self.live_with_counters() {
            self.emit(EventKind::Counters, &e);
        }
    }

    /// Refuses new work and recovers every active experiment.
    pub fn shutdown(&self) -> Vec<ApiError> {
        self.closing.store(true, Ordering::SeqCst);
        let mut errors = self.recover_all("daemon shut down").1;
        if errors.is_empty() {
            for (kind, driver) in self.drivers.all() {
                if let Err(errs) = driver.shutdown() {
                    errors.push(ApiError::Internal(format!("{kind:?} driver: {}", errs.join("; "))));
                }
            }
        }
        errors
    }
}
