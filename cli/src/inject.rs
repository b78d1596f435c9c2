//! `chaosctl inject network|stress|process ...`: builds one InjectRequest.

use std::io::Write;

use chaos_proto::chaosd::v1 as pb;
use clap::{Args, Subcommand, ValueEnum};

use crate::{
    client::CliError,
    experiment,
    output::{self, Output},
    parse,
};

#[derive(Subcommand)]
pub enum InjectCommand {
    /// Network faults inside a target's network namespace.
    #[command(subcommand)]
    Network(NetworkAction),
    /// CPU or memory stress inside a target's cgroup.
    #[command(subcommand)]
    Stress(StressAction),
    /// Kill or pause processes.
    #[command(subcommand)]
    Process(ProcessAction),
}

/// Exactly one target.
#[derive(Args, Clone, Debug)]
#[group(required = true, multiple = false)]
pub struct TargetArgs {
    /// A process: its network namespace and cgroup.
    #[arg(long)]
    pid: Option<u32>,
    /// A named network namespace (ip netns).
    #[arg(long)]
    netns: Option<String>,
    /// A network namespace file, e.g. /proc/PID/ns/net.
    #[arg(long)]
    netns_path: Option<String>,
    /// A cgroup directory under /sys/fs/cgroup.
    #[arg(long)]
    cgroup: Option<String>,
    /// Every process with this exact name (process faults).
    #[arg(long)]
    name: Option<String>,
    /// The host itself (the daemon's namespace, the root cgroup).
    #[arg(long)]
    host: bool,
}

impl TargetArgs {
    fn to_pb(&self) -> pb::Target {
        use pb::target::Kind;
        let kind = if let Some(p) = self.pid {
            Kind::Pid(p)
        } else if let Some(n) = &self.netns {
            Kind::NetnsName(n.clone())
        } else if let Some(p) = &self.netns_path {
            Kind::NetnsPath(p.clone())
        } else if let Some(c) = &self.cgroup {
            Kind::CgroupPath(c.clone())
        } else if let Some(n) = &self.name {
            Kind::ProcessName(n.clone())
        } else {
            Kind::Host(pb::Host {})
        };
        pb::Target { kind: Some(kind) }
    }
}

#[derive(Args, Clone, Debug)]
pub struct Common {
    /// How long the fault lasts (500ms, 30s, 5m, 1h); without it, until recovered.
    #[arg(long, value_parser = parse::duration, allow_hyphen_values = true)]
    duration: Option<prost_types::Duration>,
    /// Override safety refusals (foreign root qdisc, stress limits). Never overrides protected ports.
    #[arg(long)]
    force: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ProtocolArg {
    All,
    Tcp,
    Udp,
    Icmp,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DirectionArg {
    Egress,
    Ingress,
    Both,
}

#[derive(Args, Clone, Debug)]
pub struct SelectorArgs {
    /// Device in the target namespace (repeatable). Default: all but lo.
    #[arg(long = "device")]
    devices: Vec<String>,
    #[arg(long, value_enum, default_value = "all")]
    protocol: ProtocolArg,
    /// Source or destination port, or range 7000-7010 (repeatable).
    #[arg(long = "port", value_parser = parse::port_range)]
    ports: Vec<pb::PortRange>,
    /// Source port or range (repeatable).
    #[arg(long = "sport", value_parser = parse::port_range)]
    sports: Vec<pb::PortRange>,
    /// Destination port or range (repeatable).
    #[arg(long = "dport", value_parser = parse::port_range)]
    dports: Vec<pb::PortRange>,
    /// Remote peer CIDR, IPv4 or IPv6 (repeatable).
    #[arg(long = "peer")]
    peers: Vec<String>,
    #[arg(long, value_enum, default_value = "egress")]
    direction: DirectionArg,
}

impl SelectorArgs {
    fn to_pb(&self) -> pb::Selector {
        pb::Selector {
            devices: self.devices.clone(),
            protocol: match self.protocol {
                ProtocolArg::All => pb::Protocol::All,
                ProtocolArg::Tcp => pb::Protocol::Tcp,
                ProtocolArg::Udp => pb::Protocol::Udp,
                ProtocolArg::Icmp => pb::Protocol::Icmp,
            } as i32,
            ports: self.ports.clone(),
            source_ports: self.sports.clone(),
            destination_ports: self.dports.clone(),
            peers: self.peers.clone(),
            direction: match self.direction {
                DirectionArg::Egress => pb::Direction::Egress,
                DirectionArg::Ingress => pb::Direction::Ingress,
                DirectionArg::Both => pb::Direction::Both,
            } as i32,
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct NetBase {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    selector: SelectorArgs,
    #[command(flatten)]
    common: Common,
}

/// A share of the matching packets, with netem-style correlation to the
/// previous decision.
#[derive(Args, Clone, Copy, Debug)]
pub struct Chance {
    /// Percent of matching packets, above 0 and at most 100.
    #[arg(long, allow_hyphen_values = true)]
    percent: f64,
    /// Percent of correlation with the previous packet's decision.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    correlation: f64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DistributionArg {
    Uniform,
    Normal,
    Pareto,
    Paretonormal,
}

#[derive(Subcommand)]
pub enum NetworkAction {
    /// Drop a share of the matching packets (decided in BPF).
    Loss {
        #[command(flatten)]
        base: NetBase,
        #[command(flatten)]
        chance: Chance,
    },
    /// Drop every matching packet.
    Partition {
        #[command(flatten)]
        base: NetBase,
    },
    /// Delay matching packets (netem).
    Delay {
        #[command(flatten)]
        base: NetBase,
        #[arg(long, value_parser = parse::duration, allow_hyphen_values = true)]
        latency: Option<prost_types::Duration>,
        #[arg(long, value_parser = parse::duration, allow_hyphen_values = true)]
        jitter: Option<prost_types::Duration>,
        #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
        correlation: f64,
        #[arg(long, value_enum)]
        distribution: Option<DistributionArg>,
    },
    /// Limit the rate of matching traffic (HTB).
    Bandwidth {
        #[command(flatten)]
        base: NetBase,
        /// e.g. 1mbit, 512kbit, 1gbit.
        #[arg(long, value_parser = parse::rate)]
        rate: u64,
        /// Bucket size in bytes; default suits the rate.
        #[arg(long, default_value_t = 0)]
        burst: u32,
    },
    /// Duplicate a share of matching packets (netem).
    Duplicate {
        #[command(flatten)]
        base: NetBase,
        #[command(flatten)]
        chance: Chance,
    },
    /// Corrupt a share of matching packets (netem).
    Corrupt {
        #[command(flatten)]
        base: NetBase,
        #[command(flatten)]
        chance: Chance,
    },
    /// Send a share of matching packets at once and delay the rest (netem).
    Reorder {
        #[command(flatten)]
        base: NetBase,
        #[command(flatten)]
        chance: Chance,
        /// Delay of the packets not reordered.
        #[arg(long, value_parser = parse::duration, allow_hyphen_values = true)]
        latency: Option<prost_types::Duration>,
    },
}

#[derive(Args, Clone, Debug)]
pub struct StressBase {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    common: Common,
}

#[derive(Subcommand)]
pub enum StressAction {
    /// Workers each holding a share of one CPU, inside the target's cgroup.
    Cpu {
        #[command(flatten)]
        base: StressBase,
        #[arg(long, default_value_t = 1)]
        workers: u32,
        /// Percent of one CPU per worker, 1..100.
        #[arg(long, default_value_t = 100)]
        load: u32,
    },
    /// Workers holding resident memory inside the target's cgroup.
    Memory {
        #[command(flatten)]
        base: StressBase,
        /// Total size: 512MiB, 1GiB, or a share of the cgroup's limit: 90%.
        #[arg(long, value_parser = parse::memory_size)]
        size: pb::memory_stress::Size,
        #[arg(long, default_value_t = 1)]
        workers: u32,
        /// Let the kernel pick the OOM victim (by default the stressors go first).
        #[arg(long)]
        oom_target: bool,
    },
}

#[derive(Subcommand)]
pub enum ProcessAction {
    /// Send a signal (KILL by default).
    Kill {
        #[command(flatten)]
        base: StressBase,
        #[arg(long, default_value = "KILL")]
        signal: String,
    },
    /// SIGSTOP for the duration, then SIGCONT.
    Pause {
        #[command(flatten)]
        base: StressBase,
    },
}

fn network(base: NetBase, action: pb::network_action::Kind) -> (TargetArgs, Common, pb::fault::Kind) {
    let fault = pb::fault::Kind::Network(pb::NetworkFault {
        selector: Some(base.selector.to_pb()),
        action: Some(pb::NetworkAction { kind: Some(action) }),
    });
    (base.target, base.common, fault)
}

fn build(cmd: InjectCommand) -> (TargetArgs, Common, pb::fault::Kind) {
    use pb::network_action::Kind as N;
    match cmd {
        InjectCommand::Network(a) => match a {
            NetworkAction::Loss { base, chance: Chance { percent, correlation } } => {
                network(base, N::Loss(pb::Loss { percent, correlation_percent: correlation }))
            }
            NetworkAction::Partition { base } => network(base, N::Partition(pb::Partition {})),
            NetworkAction::Delay { base, latency, jitter, correlation, distribution } => network(
                base,
                N::Delay(pb::Delay {
                    latency,
                    jitter,
                    correlation_percent: correlation,
                    distribution: match distribution {
                        None => pb::Distribution::Unspecified,
                        Some(DistributionArg::Uniform) => pb::Distribution::Uniform,
                        Some(DistributionArg::Normal) => pb::Distribution::Normal,
                        Some(DistributionArg::Pareto) => pb::Distribution::Pareto,
                        Some(DistributionArg::Paretonormal) => pb::Distribution::Paretonormal,
                    } as i32,
                }),
            ),
            NetworkAction::Bandwidth { base, rate, burst } => {
                network(base, N::Bandwidth(pb::Bandwidth { rate_bits_per_second: rate, burst_bytes: burst }))
            }
            NetworkAction::Duplicate { base, chance: Chance { percent, correlation } } => {
                network(base, N::Duplicate(pb::Duplicate { percent, correlation_percent: correlation }))
            }
            NetworkAction::Corrupt { base, chance: Chance { percent, correlation } } => {
                network(base, N::Corrupt(pb::Corrupt { percent, correlation_percent: correlation }))
            }
            NetworkAction::Reorder { base, chance: Chance { percent, correlation }, latency } => {
                network(base, N::Reorder(pb::Reorder { percent, correlation_percent: correlation, latency }))
            }
        },
        InjectCommand::Stress(s) => {
            use pb::stress_fault::Kind as S;
            let (base, kind) = match s {
                StressAction::Cpu { base, workers, load } => {
                    (base, S::Cpu(pb::CpuStress { workers, load_percent: load }))
                }
                StressAction::Memory { base, size, workers, oom_target } => {
                    (base, S::Memory(pb::MemoryStress { size: Some(size), workers, oom_target }))
                }
            };
            (base.target, base.common, pb::fault::Kind::Stress(pb::StressFault { kind: Some(kind) }))
        }
        InjectCommand::Process(p) => {
            use pb::process_fault::Kind as P;
            let (base, kind) = match p {
                ProcessAction::Kill { base, signal } => (base, P::Kill(pb::Kill { signal })),
                ProcessAction::Pause { base } => (base, P::Pause(pb::Pause {})),
            };
            (base.target, base.common, pb::fault::Kind::Process(pb::ProcessFault { kind: Some(kind) }))
        }
    }
}

pub async fn run(daemon: &crate::client::Daemon, out: Output, cmd: InjectCommand) -> Result<(), CliError> {
    let (target, common, fault) = build(cmd);
    let req = pb::InjectRequest {
        target: Some(target.to_pb()),
        fault: Some(pb::Fault { kind: Some(fault) }),
        duration: common.duration,
        force: common.force,
    };
    let mut client = crate::client::connect(daemon).await?;
    let reply = client.inject(req).await.map_err(|s| crate::client::request_error(daemon, s))?;
    let note = reply.metadata().get(NOTE_HEADER).and_then(|v| v.to_str().ok()).map(String::from);
    let exp = reply.into_inner();
    let printed = match out {
        Output::Json => output::print_json(&experiment::to_json(&exp)),
        Output::Table => output::line(&exp.id),
    };
    if let Some(note) = note {
        let _ = writeln!(std::io::stderr(), "chaosctl: note: {note}");
    }
    printed.map_err(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe => CliError::closed_pipe(),
        _ => CliError::refused(format!(
            "experiment {id} was started, but writing its id to stdout failed: {e}; `chaosctl list` shows it",
            id = exp.id
        )),
    })
}

/// Response metadata in which chaosd adds a remark for the user (the
/// daemon's `service::NOTE_HEADER`).
const NOTE_HEADER: &str = "chaosd-note";
