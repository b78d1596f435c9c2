//! `NetworkDriver`: the `Driver` for network faults, one concern a file:
//! `validate` (what the host can do, what the live namespace holds, other
//! faults and daemons), `apply` (the rule in the maps, shaping for the
//! delay family and bandwidth, the classifiers, under a guard that gives
//! back what it took when anything fails), `protect` (protected ports still
//! pass) and `undo` (revert, roll-back and what is left after a sweep).

mod apply;
mod protect;
mod undo;
mod validate;

use std::{path::PathBuf, time::Duration};

use serde_json::Value;

use super::{
    bpf::{self, AttachKind, Datapath},
    objects::NetObject,
    target,
};
use crate::{
    driver::{Applied, ApplyContext, Driver, Liveness, RecordError, Recorder, decode_records},
    error::ApiError,
    experiment::{Counters, Experiment},
    owner::Owner,
    probe::HostProbe,
    spec::Fault,
};

/// Configuration of the network driver.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Dead man's switch: rules are ignored once the heartbeat is older.
    pub grace: Duration,
    /// Ports never matched (22 by default, plus the API's TCP port if any).
    pub protected_ports: Vec<u16>,
    /// The API's unix socket (its traffic never crosses a tc hook; kept to
    /// name it in errors).
    pub api_socket: PathBuf,
    /// chaosd's directory on bpffs (e.g. /sys/fs/bpf/chaosd); bpffs is
    /// mounted on its parent when absent.
    pub bpffs: PathBuf,
    /// Whose objects this daemon's are (labels in the kernel, see `owner`).
    pub owner: Owner,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(5),
            protected_ports: vec![22],
            api_socket: PathBuf::from("/run/chaosd/chaosd.sock"),
            bpffs: PathBuf::from("/sys/fs/bpf/chaosd"),
            owner: Owner::new("/var/lib/chaosd"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("network driver: {0}")]
pub struct NetInitError(#[from] pub bpf::BpfError);

/// What the host can do, from the probe.
#[derive(Clone, Debug)]
struct Caps {
    netem: Result<(), String>,
    htb: Result<(), String>,
    ifb: Result<(), String>,
}

pub struct NetworkDriver {
    dp: Datapath,
    config: NetConfig,
    caps: Caps,
    /// Users' root qdisc trees that forced faults replaced, by (namespace,
    /// device), while chaosd's HTB is there: a later fault sharing that HTB
    /// records the same tree, so whichever fault removes the HTB last puts
    /// the user's tree back. Refilled from the journal at adopt.
    saved_roots: std::sync::Mutex<std::collections::HashMap<(u32, String), super::qdisc_tree::SavedTree>>,
    /// The namespace (inode) of each active experiment of this driver, so
    /// that the conflict check of a new fault resolves no other target.
    netns_of: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

fn api_internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

impl NetworkDriver {
    pub fn new(probe: &HostProbe, config: NetConfig) -> Result<Self, NetInitError> {
        let dp = Datapath::open(&config.bpffs, config.grace, &config.protected_ports, probe.tcx.available)?;
        let avail = |p: &crate::probe::Probe| if p.available { Ok(()) } else { Err(p.detail.clone()) };
        let caps = Caps { netem: avail(&probe.netem), htb: avail(&probe.htb), ifb: avail(&probe.ifb) };
        Ok(Self { dp, config, caps, saved_roots: Default::default(), netns_of: Default::default() })
    }

    /// The datapath (benchmarks and tests read counters and pins from it).
    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }

    fn attach_kind(&self) -> AttachKind {
        if self.dp.tcx { AttachKind::Tcx } else { AttachKind::Clsact }
    }
}

fn decoded(objects: &[Value]) -> Result<Vec<NetObject>, RecordError> {
    decode_records("network", objects)
}

impl Driver for NetworkDriver {
    fn apply(&self, exp: &Experiment, ctx: &ApplyContext<'_>, rec: &mut dyn Recorder) -> Result<Applied, ApiError> {
        let Fault::Network(fault) = &exp.fault else {
            return Err(ApiError::InvalidArgument(format!(
                "the network driver cannot apply a {} fault",
                exp.fault.name()
            )));
        };
        self.check_host(&fault.action, fault.selector.direction.ingress())?;
        // All-or-nothing: unless kept, whatever was taken goes again.
        let mut taken = apply::Taken::new(self, exp);
        self.apply_inner(exp, fault, ctx, rec, &mut taken)?;
        taken.keep();
        Ok(Applied::Active)
    }

    fn decode(&self, objects: &[Value]) -> Result<(), RecordError> {
        decoded(objects).map(drop)
    }

    fn revert(&self, exp: &Experiment, objects: &[Value]) -> Result<(), Vec<String>> {
        let objs = decoded(objects).map_err(|e| vec![format!("{e}; nothing of {} was removed", exp.id)])?;
        let errors = self.undo(exp, &objs);
        self.forget_restored_roots(exp, &objs);
        self.netns_of.lock().unwrap_or_else(|p| p.into_inner()).remove(&exp.id);
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    fn counters(&self, _exp: &Experiment, objects: &[Value]) -> Counters {
        let mut c = Counters::default();
        // Best effort, as counters are: records that do not decode count 0.
        for o in decoded(objects).unwrap_or_default() {
            if let NetObject::Rule { rule, .. } = o {
                let s = self.dp.rule_stats(rule);
                c.packets_matched += s.matched;
                c.packets_dropped += s.dropped;
                c.packets_delayed += s.delayed;
            }
        }
        c
    }

    fn liveness(&self, exp: &Experiment, objects: &[Value]) -> Liveness {
        let recorded = decoded(objects).unwrap_or_default().iter().find_map(|o| match o {
            NetObject::Rule { netns, .. } => Some(*netns),
            _ => None,
        });
        match (target::resolve(&exp.target), recorded) {
            (Ok(t), Some(n)) if t.inode == n => Liveness::Alive,
            (Ok(_), None) => Liveness::Alive,
            _ => Liveness::Gone,
        }
    }

    fn adopt(&self, exp: &Experiment, objects: &[Value]) -> Result<(), ApiError> {
        if self.dp.stale_at_start {
            return Err(ApiError::FailedPrecondition(format!(
                "chaosd was down longer than the grace period ({:?}): the kernel had already stopped every \
                 network fault, so {} is not resumed",
                self.config.grace, exp.id
            )));
        }
        let objs = decoded(objects).map_err(|e| ApiError::FailedPrecondition(e.to_string()))?;
        {
            let mut known = self.saved_roots.lock().unwrap_or_else(|p| p.into_inner());
            for o in &objs {
                if let NetObject::SavedRoot { netns, ifname, tree } = o {
                    known.entry((*netns, ifname.clone())).or_insert_with(|| tree.clone());
                }
            }
        }
        let Some(NetObject::Rule { netns, rule, .. }) =
            objs.iter().find(|o| matches!(o, NetObject::Rule { .. })).cloned()
        else {
            return Err(ApiError::FailedPrecondition(format!("{}: no rule recorded, nothing to resume", exp.id)));
        };
        let t = target::resolve(&exp.target)?;
        if t.inode != netns {
            return Err(ApiError::NotFound(format!("the target of {} is a different network namespace now", exp.id)));
        }
        let mut maps = self.dp.lock();
        let live = maps.rules.get(&rule, 0).map(|r| r.action != chaosd_common::ACTION_NONE).unwrap_or(false);
        if !live {
            return Err(ApiError::FailedPrecondition(format!("{}: rule {rule} is no longer in the kernel", exp.id)));
        }
        maps.used_ids.insert(rule);
        self.netns_of.lock().unwrap_or_else(|p| p.into_inner()).insert(exp.id.clone(), netns);
        Ok(())
    }

    fn sweep(&self, known: &[(Experiment, Vec<Value>)]) -> Vec<String> {
        super::sweep::sweep(&self.dp, &self.config.owner, known)
    }

    fn shutdown(&self) -> Result<(), Vec<String>> {
        match self.dp.remove_pins_if_idle() {
            Ok(true) => Ok(()),
            Ok(false) => Err(vec![format!("classifiers are still pinned under {}", self.dp.dir().display())]),
            Err(e) => Err(vec![e.to_string()]),
        }
    }

    fn ended_by_kernel(&self, active: &[Experiment]) -> Vec<(String, String)> {
        // Once the heartbeat is older than the grace period every rule is
        // inert in the kernel; the next heartbeat would bring them all back.
        // So they end here, before `tick` writes that heartbeat.
        let gap = self.dp.since_last_beat();
        if gap <= self.dp.grace() || active.is_empty() {
            return Vec::new();
        }
        let reason = format!(
            "chaosd could not run for {:.1} s (stopped or stalled), longer than the grace period ({:?}): the \
             kernel's dead man's switch had already ended the fault, so it was not re-armed",
            gap.as_secs_f64(),
            self.dp.grace()
        );
        active.iter().map(|e| (e.id.clone(), reason.clone())).collect()
    }

    fn verify(&self, exp: &Experiment, objects: &[Value]) -> Result<(), String> {
        let objs = decoded(objects).map_err(|e| e.to_string())?;
        super::verify::verify(&self.dp, &self.config.owner, exp, &objs)
    }

    fn tick(&self) -> Vec<(String, String)> {
        // A failed refresh lets the dead man's switch fire, which is the
        // safe direction; nothing else to do here.
        let _ = self.dp.heartbeat();
        Vec::new()
    }
}
