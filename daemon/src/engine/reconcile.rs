//! Reconciliation at start: what the journal says was in force when the
//! daemon last stopped, against what is true now.

use std::time::SystemTime;

use serde_json::Value;

use super::{DriverKind, Engine, Live, lock};
use crate::{
    driver::Liveness,
    error::ApiError,
    experiment::{Experiment, State},
    journal::JournalError,
};

/// Outcome of reconciliation at start, for the log.
#[derive(Debug, Default)]
pub struct Reconciled {
    pub resumed: Vec<String>,
    pub reverted: Vec<(String, String)>,
    pub swept: Vec<String>,
    /// Entries left in the journal as they are, with why: an experiment or
    /// a record of it that does not decode (another chaosd version, damage).
    /// Nothing of them is reverted, adopted or deleted; the operator
    /// decides. Each is also logged as an error.
    pub kept: Vec<(String, String)>,
}

impl Engine {
    /// At start: closes what an earlier boot left, reverts what expired, lost
    /// its target or was caught half-way, resumes what is still due, then
    /// lets each driver sweep marked objects that no entry owns.
    pub fn reconcile(&self) -> Result<Reconciled, ApiError> {
        let boot_id = self.journal().boot_id().to_string();
        let (unfinished, unreadable) = self.journal().unfinished().map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut out = Reconciled::default();
        for e in unreadable {
            let id = match &e {
                JournalError::Decode { id, .. } => id.clone(),
                _ => String::new(),
            };
            tracing::error!(%id, error = %e, "journal entry kept as it is: it does not decode");
            out.kept.push((id, e.to_string()));
        }
        let now = SystemTime::now();
        for u in unfinished {
            let mut exp = u.experiment;
            if let Ok(driver) = self.drivers.get(DriverKind::of(&exp.fault))
                && let Err(e) = driver.decode(&u.objects)
            {
                tracing::error!(id = %exp.id, error = %e, "journal entry kept as it is: a record does not decode");
                out.kept.push((exp.id.clone(), e.to_string()));
                continue;
            }
            let end = |engine: &Self, exp: &mut Experiment, state: State, reason: String| {
                exp.state = state;
                exp.reason = reason;
                exp.ended_at = Some(SystemTime::now());
                engine.save(exp);
            };
            if u.boot_id != boot_id {
                end(self, &mut exp, State::Expired, "ended by reboot".into());
                out.reverted.push((exp.id.clone(), "ended by reboot".into()));
                continue;
            }
            let driver = match self.drivers.get(DriverKind::of(&exp.fault)) {
                Ok(d) => d,
                Err(e) => {
                    end(self, &mut exp, State::Failed, format!("cannot reconcile: {e}"));
                    continue;
                }
            };
            let why_revert = if exp.state != State::Active {
                Some((State::Failed, format!("daemon stopped while {}", exp.state.name())))
            } else if exp.ends_at.is_some_and(|t| t <= now) {
                Some((State::Expired, "duration elapsed while the daemon was down".to_string()))
            } else if driver.liveness(&exp, &u.objects) == Liveness::Gone {
                Some((State::Failed, format!("target gone: {}", exp.target)))
            } else {
                match driver.adopt(&exp, &u.objects) {
                    Ok(()) => None,
                    Err(e) => Some((State::Failed, format!("could not resume after restart: {e}"))),
                }
            };
            match why_revert {
                None => {
                    tracing::info!(id = %exp.id, "resumed after restart");
                    out.resumed.push(exp.id.clone());
                    lock(&self.live).insert(exp.id.clone(), Live { exp, objects: u.objects });
                }
                Some((state, reason)) => {
                    let reason = match driver.revert(&exp, &u.objects) {
                        Ok(()) => reason,
                        Err(errs) => format!("{reason}; recovery incomplete: {}", errs.join("; ")),
                    };
                    out.reverted.push((exp.id.clone(), reason.clone()));
                    end(self, &mut exp, state, reason);
                }
            }
        }
        let known: Vec<(Experiment, Vec<Value>)> =
            lock(&self.live).values().map(|l| (l.exp.clone(), l.objects.clone())).collect();
        for (kind, driver) in self.drivers.all() {
            let mine: Vec<(Experiment, Vec<Value>)> =
                known.iter().filter(|(e, _)| DriverKind::of(&e.fault) == kind).cloned().collect();
            out.swept.extend(driver.sweep(&mine));
        }
        Ok(out)
    }
}
