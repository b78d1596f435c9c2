//! Types shared by chaosd's eBPF programs and the daemon. Every map key and
//! value is `#[repr(C)]`, `Copy`, with explicit padding, so both sides agree
//! on the layout byte for byte.
//!
//! How a packet finds its rule (see daemon/src/net/architecture.md):
//! `DEVICES[(netns, ifindex, direction)]` says which index tables hold
//! entries for the device; the program then does at most six exact hash
//! lookups in `INDEX` — (proto | all) x (dport | sport | any port) — each
//! giving a slot of at most `SLOT_RULES` rule ids, and checks those
//! candidates against `RULES` (deadline, residual port ranges, peer LPM).
//! The work per packet is bounded by constants, never by the rule count.
#![no_std]

/// Index of the heartbeat slot in the `CHAOSD_CONTROL` array map.
pub const CONTROL_HEARTBEAT: u32 = 0;

/// Rule ids are 1..MAX_RULES (0 marks an empty slot entry).
pub const MAX_RULES: u32 = 16384;
/// Rules that may share one index key (same device, direction, protocol,
/// port role and port) but differ elsewhere (peers, other port).
pub const SLOT_RULES: usize = 4;
/// Port ranges of the one list a rule checks itself (the other lists are
/// expanded into exact index keys, so the program never scans them).
pub const MAX_RANGES: usize = 4;
/// Index entries (device x direction x protocol x role x port).
pub const MAX_INDEX: u32 = 262_144;
/// Devices (netns x ifindex x direction) with rules.
pub const MAX_DEVICES: u32 = 4096;
/// Peer prefixes over all rules.
pub const MAX_PEERS: u32 = 65_536;
/// Protected ports (never matched).
pub const MAX_PROTECTED: u32 = 64;

pub const DIR_EGRESS: u8 = 0;
pub const DIR_INGRESS: u8 = 1;

/// Index roles: which port of the packet the key's port is compared with.
pub const ROLE_ANY: u8 = 0;
pub const ROLE_SPORT: u8 = 1;
pub const ROLE_DPORT: u8 = 2;

/// Protocol in index keys and rules: the IP protocol number, or 0 for all.
pub const PROTO_ALL: u8 = 0;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// `DevConf::mask` bit for an index table: `mask_bit(all_protocols, role)`.
pub const fn mask_bit(all_protocols: bool, role: u8) -> u32 {
    1 << ((all_protocols as u32) * 3 + role as u32)
}

pub const ACTION_NONE: u8 = 0;
/// Drop with probability `loss_threshold / 2^32` (correlated like netem).
pub const ACTION_LOSS: u8 = 1;
/// Drop everything matched.
pub const ACTION_PARTITION: u8 = 2;
/// Steer to the HTB class `classid` (egress: skb->priority; ingress: also
/// redirected to the device's IFB).
pub const ACTION_CLASSIFY: u8 = 3;

/// Handle major of chaosd's HTB qdiscs (c4a0:); classids under it are
/// what the classifier writes into skb->priority.
pub const HTB_MAJOR: u16 = 0xc4a0;

/// Rule flag: the rule has peer prefixes in `PEERS`.
pub const FLAG_PEERS: u8 = 1;

/// Global control block: the daemon refreshes `heartbeat_ns` (CLOCK_BOOTTIME,
/// as `bpf_ktime_get_boot_ns`) and the programs ignore every rule once it is
/// older than `grace_ns` (dead man's switch).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    pub heartbeat_ns: u64,
    pub grace_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevKey {
    /// Inode of the network namespace (ifindexes are per namespace).
    pub netns: u32,
    pub ifindex: u32,
    pub dir: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevConf {
    /// Which index tables have entries for this device (`mask_bit`).
    pub mask: u32,
    /// Ingress only: the IFB device that delayed packets are redirected to
    /// (0: none).
    pub ifb_ifindex: u32,
    /// Rules using each index table (daemon bookkeeping, kept in the pinned
    /// map so that a restarted daemon knows who still needs the device).
    pub users: [u16; 6],
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IndexKey {
    pub netns: u32,
    pub ifindex: u32,
    pub dir: u8,
    pub proto: u8,
    pub role: u8,
    pub _pad: u8,
    pub port: u16,
    pub _pad2: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    pub rules: [u32; SLOT_RULES],
}

/// Inclusive port range; an all-zero range is unused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortSpan {
    pub first: u16,
    pub last: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// CLOCK_BOOTTIME deadline in ns; 0: none.
    pub deadline_ns: u64,
    /// Loss: drop when a (correlated) random u32 is below this (0..=2^32).
    pub loss_threshold: u64,
    /// Correlation scaled to u32 (netem's rho); 0: independent.
    pub correlation: u32,
    /// HTB class for ACTION_CLASSIFY (major:minor as in skb->priority).
    pub classid: u32,
    pub action: u8,
    /// PROTO_ALL or an IP protocol number.
    pub proto: u8,
    pub flags: u8,
    /// Which packet port `resid` is checked against (ROLE_SPORT,
    /// ROLE_DPORT, or ROLE_ANY for either); ignored when `n_resid` is 0.
    pub resid_role: u8,
    pub n_resid: u8,
    /// The rule has ports (so port-less packets never match it).
    pub has_ports: u8,
    pub _pad: [u8; 2],
    pub resid: [PortSpan; MAX_RANGES],
}

/// Key of the peer LPM trie: the rule id (always matched in full) followed
/// by the peer address, IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub rule: [u8; 4],
    pub addr: [u8; 16],
}

/// Per-CPU counters and correlation state of one rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    pub matched: u64,
    pub dropped: u64,
    pub delayed: u64,
    /// Last correlated random value (netem's crndstate.last).
    pub last_random: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // Each type below is repr(C) with only integer fields and arrays of
    // them, and its padding made explicit, so every bit pattern is valid.
    // SAFETY: repr(C), integers only, explicit padding (see above).
    unsafe impl aya::Pod for Control {}
    // SAFETY: repr(C), integers only, explicit padding (see above).
    unsafe impl aya::Pod for DevKey {}
    // SAFETY: repr(C), integers only, explicit padding (see above).
    unsafe impl aya::Pod for DevConf {}
    // SAFETY: repr(C), integers only, explicit padding (see above).
    unsafe impl aya::Pod for IndexKey {}
    // SAFETY: repr(C), integers only, explicit padding (see above).
    unsafe impl aya::Pod for Slot {}
    // SAFETY: repr(C), integers only, explicit padding (see above).
    unsafe impl aya::Pod for PortSpan {}
    // SAFETY: repr(C), integers only, explicit padding (see above).
    unsafe impl aya::Pod for Rule {}
    // SAFETY: repr(C), integers only, explicit padding (see above).
    unsafe impl aya::Pod for PeerKey {}
    // SAFETY: repr(C), integers only, explicit padding (see above).
    unsafe impl aya::Pod for RuleStats {}
}
