//! An experiment as the daemon keeps it: target + fault + timing + state.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::spec::{Fault, Target};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    Pending,
    Injecting,
    Active,
    Recovering,
    Recovered,
    Failed,
    Expired,
}

impl State {
    /// The state as the journal stores it and messages name it.
    pub fn name(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Injecting => "injecting",
            State::Active => "active",
            State::Recovering => "recovering",
            State::Recovered => "recovered",
            State::Failed => "failed",
            State::Expired => "expired",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, State::Recovered | State::Failed | State::Expired)
    }
}

/// Counters of one experiment, gathered from the kernel on demand.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub packets_matched: u64,
    pub packets_dropped: u64,
    pub packets_delayed: u64,
    pub stress_cpu_time_ns: u64,
    pub stress_resident_bytes: u64,
    pub oom_kills: u64,
    pub processes_signalled: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Experiment {
    pub id: String,
    pub target: Target,
    pub fault: Fault,
    pub state: State,
    /// Why it failed or how it ended.
    pub reason: String,
    pub created_at: SystemTime,
    /// None: until recovered.
    pub duration: Option<Duration>,
    pub ends_at: Option<SystemTime>,
    pub ended_at: Option<SystemTime>,
    pub forced: bool,
    /// Last counters read (kept after the kernel objects are gone).
    pub counters: Counters,
}

impl Experiment {
    /// A new experiment about to be injected: its deadline is `duration`
    /// after `now`.
    pub fn new(
        id: String,
        target: Target,
        fault: Fault,
        duration: Option<Duration>,
        forced: bool,
        now: SystemTime,
    ) -> Self {
        Self {
            id,
            target,
            fault,
            state: State::Injecting,
            reason: String::new(),
            created_at: now,
            duration,
            ends_at: duration.map(|d| now + d),
            ended_at: None,
            forced,
            counters: Counters::default(),
        }
    }

    pub fn remaining(&self, now: SystemTime) -> Option<Duration> {
        self.ends_at.map(|end| end.duration_since(now).unwrap_or_default())
    }
}
