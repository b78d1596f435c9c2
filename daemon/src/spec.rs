//! The daemon's own description of experiments: targets and faults, already
//! validated. Converted from the wire types in `convert`, stored in the
//! journal as JSON (never the wire types).

use std::{path::PathBuf, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Target {
    Pid(u32),
    NetnsName(String),
    NetnsPath(PathBuf),
    /// Absolute path under /sys/fs/cgroup (v2), or a path relative to each
    /// v1 controller's hierarchy, stored as given by the user.
    Cgroup(PathBuf),
    Host,
    ProcessName(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Pid(p) => write!(f, "pid {p}"),
            Target::NetnsName(n) => write!(f, "netns {n}"),
            Target::NetnsPath(p) => write!(f, "netns {}", p.display()),
            Target::Cgroup(p) => write!(f, "cgroup {}", p.display()),
            Target::Host => write!(f, "host"),
            Target::ProcessName(n) => write!(f, "processes named {n}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Fault {
    Network(NetworkFault),
    Stress(StressFault),
    Process(ProcessFault),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetworkFault {
    pub selector: Selector,
    pub action: NetAction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    All,
    Tcp,
    Udp,
    /// ICMP and ICMPv6.
    Icmp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Direction {
    Egress,
    Ingress,
    Both,
}

impl Direction {
    pub fn egress(self) -> bool {
        matches!(self, Direction::Egress | Direction::Both)
    }
    pub fn ingress(self) -> bool {
        matches!(self, Direction::Ingress | Direction::Both)
    }
}

/// Inclusive port range, 1..=65535, first <= last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

/// Which packets a network fault acts on. Empty lists match everything.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Selector {
    /// Empty: every device of the namespace but lo.
    pub devices: Vec<String>,
    pub protocol: Protocol,
    /// Source or destination port.
    pub ports: Vec<PortRange>,
    pub source_ports: Vec<PortRange>,
    pub destination_ports: Vec<PortRange>,
    pub peers: Vec<IpNet>,
    pub direction: Direction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Distribution {
    Uniform,
    Normal,
    Pareto,
    ParetoNormal,
}

/// Percentages are in [0, 100].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum NetAction {
    Delay { latency: Duration, jitter: Duration, correlation: f64, distribution: Option<Distribution> },
    Loss { percent: f64, correlation: f64 },
    Partition,
    Bandwidth { rate_bps: u64, burst_bytes: u32 },
    Duplicate { percent: f64, correlation: f64 },
    Corrupt { percent: f64, correlation: f64 },
    Reorder { percent: f64, correlation: f64, latency: Duration },
}

impl NetAction {
    /// Actions carried out by netem (need sch_netem in the kernel).
    pub fn needs_netem(&self) -> bool {
        matches!(
            self,
            NetAction::Delay { .. }
                | NetAction::Duplicate { .. }
                | NetAction::Corrupt { .. }
                | NetAction::Reorder { .. }
        )
    }

    /// Actions carried out by qdiscs (HTB, netem), not by the classifier
    /// alone: they replace the device's root qdisc.
    pub fn shapes(&self) -> bool {
        self.needs_netem() || matches!(self, NetAction::Bandwidth { .. })
    }

    pub fn name(&self) -> &'static str {
        match self {
            NetAction::Delay { .. } => "delay",
            NetAction::Loss { .. } => "loss",
            NetAction::Partition => "partition",
            NetAction::Bandwidth { .. } => "bandwidth",
            NetAction::Duplicate { .. } => "duplicate",
            NetAction::Corrupt { .. } => "corrupt",
            NetAction::Reorder { .. } => "reorder",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StressFault {
    /// `workers` processes each holding `load_percent` of one CPU.
    Cpu {
        workers: u32,
        load_percent: u32,
    },
    Memory {
        size: MemorySize,
        workers: u32,
        oom_target: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum MemorySize {
    Bytes(u64),
    /// Share of the target cgroup's memory limit, (0, 100].
    PercentOfLimit(f64),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ProcessFault {
    Kill {
        signal: i32,
    },
    /// SIGSTOP for the duration, then SIGCONT.
    Pause,
}

impl Fault {
    /// Short name: "loss", "cpu", "pause", ...
    pub fn name(&self) -> &'static str {
        match self {
            Fault::Network(n) => n.action.name(),
            Fault::Stress(StressFault::Cpu { .. }) => "stress-cpu",
            Fault::Stress(StressFault::Memory { .. }) => "stress-memory",
            Fault::Process(ProcessFault::Kill { .. }) => "kill",
            Fault::Process(ProcessFault::Pause) => "pause",
        }
    }
}
