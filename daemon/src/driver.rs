//! The contract between the engine and the fault drivers (network, stress,
//! process). Drivers are synchronous: the engine calls them from blocking
//! threads, one request per target at a time.
//!
//! Every kernel object a driver creates is described by an object of the
//! driver's own type (`NetObject`, the process and stress drivers' enums),
//! stored as JSON and recorded in the journal through `Recorder` BEFORE the
//! object is created (intent first), so that a crash at any point leaves a
//! journal entry from which the object can be found and removed. A record
//! that does not decode into its driver's type is an error (`RecordError`),
//! never skipped.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    error::ApiError,
    experiment::{Counters, Experiment},
};

/// Writes an object description to the journal. Fails when the journal
/// cannot be written; the driver must then not create the object.
pub trait Recorder: Send {
    fn record(&mut self, object: Value) -> Result<(), ApiError>;

    /// Records several objects at once (one journal commit).
    fn record_all(&mut self, objects: Vec<Value>) -> Result<(), ApiError> {
        objects.into_iter().try_for_each(|o| self.record(o))
    }
}

/// A journal record that is not an object of the driver's type (written by
/// another chaosd version, or damaged).
#[derive(Debug, thiserror::Error)]
#[error("journal record {index} ({record}) is not a {driver} driver object: {source}")]
pub struct RecordError {
    /// Position among the experiment's records, from 0.
    pub index: usize,
    pub record: String,
    pub driver: &'static str,
    #[source]
    pub source: serde_json::Error,
}

/// Decodes an experiment's records into a driver's object type, all or
/// nothing: the first that does not decode is the error.
pub fn decode_records<T: DeserializeOwned>(driver: &'static str, objects: &[Value]) -> Result<Vec<T>, RecordError> {
    objects
        .iter()
        .enumerate()
        .map(|(index, v)| {
            T::deserialize(v).map_err(|source| RecordError { index, record: v.to_string(), driver, source })
        })
        .collect()
}

/// What the engine knows when it asks a driver to apply a fault.
pub struct ApplyContext<'a> {
    /// The other active experiments of this driver kind (for conflicts).
    pub active: &'a [Experiment],
    /// How long the fault lasts once it is in effect, if it ends by itself.
    /// Drivers set kernel-side deadlines from it at the moment the fault
    /// takes effect, so a slow apply does not eat into the fault.
    pub duration: Option<Duration>,
}

/// Whether a reverted experiment's target still exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// The pid exited, the namespace or cgroup was removed.
    Gone,
}

/// What an applied fault is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// In force until it is recovered or its duration ends.
    Active,
    /// Already over once applied (a signal, once sent): nothing stays to
    /// recover. `reason` says what was done.
    Done { reason: String },
}

pub trait Driver: Send + Sync {
    /// Applies the fault. All-or-nothing: when it returns an error, whatever
    /// it created has been removed again (and the error says what went
    /// wrong and what to do).
    fn apply(&self, exp: &Experiment, ctx: &ApplyContext<'_>, rec: &mut dyn Recorder) -> Result<Applied, ApiError>;

    /// Whether every record decodes into this driver's object type. The
    /// engine asks before it reverts or adopts what a journal left: an
    /// experiment with a record that does not decode is reported and left
    /// in the journal as it is, for the operator.
    fn decode(&self, objects: &[Value]) -> Result<(), RecordError>;

    /// Removes every recorded object. Keeps going past failures and returns
    /// them all. Objects already gone (target exited) are not errors.
    fn revert(&self, exp: &Experiment, objects: &[Value]) -> Result<(), Vec<String>>;

    /// Current counters (best effort; zero where unknown).
    fn counters(&self, exp: &Experiment, objects: &[Value]) -> Counters;

    /// Whether the target still exists.
    fn liveness(&self, exp: &Experiment, objects: &[Value]) -> Liveness;

    /// After a daemon restart: takes over a still-due experiment whose
    /// objects are in place (re-arming timers, heartbeats, guardians).
    /// An error means it could not be resumed; the engine then reverts it.
    fn adopt(&self, exp: &Experiment, objects: &[Value]) -> Result<(), ApiError>;

    /// After reconciliation: removes objects that carry chaosd's marks but
    /// belong to no journal entry in `known`. Returns what it removed.
    fn sweep(&self, known: &[(Experiment, Vec<Value>)]) -> Vec<String>;

    /// Called before each `tick`: the experiments of `active` that the
    /// kernel already ended on its own, with the reason — e.g. the daemon
    /// could not run (SIGSTOP, a stall) for longer than the dead man's
    /// switch allows. The engine ends and reverts them before `tick` may
    /// re-arm anything, so a fault that was switched off never silently
    /// comes back.
    fn ended_by_kernel(&self, _active: &[Experiment]) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Whether an active experiment's kernel objects are all present and in
    /// force; `Err` says what is not (the engine then ends it as failed
    /// rather than listing a fault that does nothing).
    fn verify(&self, _exp: &Experiment, _objects: &[Value]) -> Result<(), String> {
        Ok(())
    }

    /// Periodic work (every ~100 ms): e.g. refreshing the BPF heartbeat.
    /// Returns experiments whose fault ended by itself (e.g. OOM-killed
    /// stressors), with the reason.
    fn tick(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Clean stop of the daemon, after every experiment was recovered:
    /// removes what the driver keeps between experiments (pinned maps,
    /// helper threads), so a stopped chaosd leaves nothing behind.
    fn shutdown(&self) -> Result<(), Vec<String>> {
        Ok(())
    }
}
