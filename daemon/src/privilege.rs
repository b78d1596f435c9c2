//! The daemon's privileges: checked at start (with a message naming what is
//! missing) and narrowed to what chaosd uses.

use caps::{CapSet, Capability};

/// Capabilities chaosd needs, and what for.
pub const REQUIRED: &[(Capability, &str)] = &[
    (Capability::CAP_NET_ADMIN, "qdiscs, filters, links"),
    (Capability::CAP_SYS_ADMIN, "setns, bpffs mount, BPF maps"),
    (Capability::CAP_BPF, "loading BPF programs"),
    (Capability::CAP_KILL, "process faults and stressors"),
    (Capability::CAP_SYS_PTRACE, "opening other processes' namespaces"),
];

/// Also kept: used by normal file work as root and by probes.
pub const KEPT: &[Capability] = &[
    Capability::CAP_PERFMON,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_CHOWN,
    Capability::CAP_SYS_RESOURCE,
    Capability::CAP_NET_RAW,
    Capability::CAP_SETPCAP,
];

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("chaosd lacks {missing}: run it as root (`sudo chaosd serve`) or grant these capabilities")]
    Missing { missing: String },
    #[error("reading the process capabilities: {0}")]
    Read(#[source] caps::errors::CapsError),
}

/// Fails with the list of missing capabilities (each with its use).
pub fn check() -> Result<(), PrivilegeError> {
    let effective = caps::read(None, CapSet::Effective).map_err(PrivilegeError::Read)?;
    let missing: Vec<String> =
        REQUIRED.iter().filter(|(c, _)| !effective.contains(c)).map(|(c, why)| format!("{c} ({why})")).collect();
    if missing.is_empty() { Ok(()) } else { Err(PrivilegeError::Missing { missing: missing.join(", ") }) }
}

/// Drops every capability chaosd does not use from the effective,
/// permitted and inheritable sets. Returns the names dropped.
pub fn drop_unneeded() -> Result<Vec<String>, caps::errors::CapsError> {
    let keep: Vec<Capability> = REQUIRED.iter().map(|(c, _)| *c).chain(KEPT.iter().copied()).collect();
    let permitted = caps::read(None, CapSet::Permitted)?;
    let mut dropped: Vec<String> = permitted.iter().filter(|c| !keep.contains(c)).map(|c| c.to_string()).collect();
    dropped.sort();
    for set in [CapSet::Effective, CapSet::Inheritable, CapSet::Permitted] {
        let current = caps::read(None, set)?;
        let narrowed = current.into_iter().filter(|c| keep.contains(c)).collect();
        caps::set(None, set, &narrowed)?;
    }
    Ok(dropped)
}
