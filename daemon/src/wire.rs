//! The daemon's types back to the wire (chaosd.v1), for replies and the
//! `Watch` stream.

use chaos_proto::{chaosd::v1 as pb, duration_to_proto, timestamp_to_proto};

use crate::{
    display::{signal_name, summary},
    experiment::{Counters, Experiment, State},
    spec::*,
};

pub fn target_to_pb(t: &Target) -> pb::Target {
    use pb::target::Kind;
    let kind = match t {
        Target::Pid(p) => Kind::Pid(*p),
        Target::NetnsName(n) => Kind::NetnsName(n.clone()),
        Target::NetnsPath(p) => Kind::NetnsPath(p.display().to_string()),
        Target::Cgroup(p) => Kind::CgroupPath(p.display().to_string()),
        Target::Host => Kind::Host(pb::Host {}),
        Target::ProcessName(n) => Kind::ProcessName(n.clone()),
    };
    pb::Target { kind: Some(kind) }
}

fn ports_to_pb(r: &[PortRange]) -> Vec<pb::PortRange> {
    r.iter().map(|r| pb::PortRange { first: r.first.into(), last: r.last.into() }).collect()
}

pub fn fault_to_pb(f: &Fault) -> pb::Fault {
    use pb::fault::Kind;
    let kind = match f {
        Fault::Network(n) => {
            use pb::network_action::Kind as A;
            let s = &n.selector;
            let selector = pb::Selector {
                devices: s.devices.clone(),
                protocol: match s.protocol {
                    Protocol::All => pb::Protocol::All,
                    Protocol::Tcp => pb::Protocol::Tcp,
                    Protocol::Udp => pb::Protocol::Udp,
                    Protocol::Icmp => pb::Protocol::Icmp,
                } as i32,
                ports: ports_to_pb(&s.ports),
                source_ports: ports_to_pb(&s.source_ports),
                destination_ports: ports_to_pb(&s.destination_ports),
                peers: s.peers.iter().map(|p| p.to_string()).collect(),
                direction: match s.direction {
                    Direction::Egress => pb::Direction::Egress,
                    Direction::Ingress => pb::Direction::Ingress,
                    Direction::Both => pb::Direction::Both,
                } as i32,
            };
            let action = match &n.action {
                NetAction::Delay { latency, jitter, correlation, distribution } => A::Delay(pb::Delay {
                    latency: Some(duration_to_proto(*latency)),
                    jitter: Some(duration_to_proto(*jitter)),
                    correlation_percent: *correlation,
                    distribution: match distribution {
                        None => pb::Distribution::Unspecified,
                        Some(Distribution::Uniform) => pb::Distribution::Uniform,
                        Some(Distribution::Normal) => pb::Distribution::Normal,
                        Some(Distribution::Pareto) => pb::Distribution::Pareto,
                        Some(Distribution::ParetoNormal) => pb::Distribution::Paretonormal,
                    } as i32,
                }),
                NetAction::Loss { percent, correlation } => {
                    A::Loss(pb::Loss { percent: *percent, correlation_percent: *correlation })
                }
                NetAction::Partition => A::Partition(pb::Partition {}),
                NetAction::Bandwidth { rate_bps, burst_bytes } => {
                    A::Bandwidth(pb::Bandwidth { rate_bits_per_second: *rate_bps, burst_bytes: *burst_bytes })
                }
                NetAction::Duplicate { percent, correlation } => {
                    A::Duplicate(pb::Duplicate { percent: *percent, correlation_percent: *correlation })
                }
                NetAction::Corrupt { percent, correlation } => {
                    A::Corrupt(pb::Corrupt { percent: *percent, correlation_percent: *correlation })
                }
                NetAction::Reorder { percent, correlation, latency } => A::Reorder(pb::Reorder {
                    percent: *percent,
                    correlation_percent: *correlation,
                    latency: Some(duration_to_proto(*latency)),
                }),
            };
            Kind::Network(pb::NetworkFault {
                selector: Some(selector),
                action: Some(pb::NetworkAction { kind: Some(action) }),
            })
        }
        Fault::Stress(StressFault::Cpu { workers, load_percent }) => Kind::Stress(pb::StressFault {
            kind: Some(pb::stress_fault::Kind::Cpu(pb::CpuStress { workers: *workers, load_percent: *load_percent })),
        }),
        Fault::Stress(StressFault::Memory { size, workers, oom_target }) => Kind::Stress(pb::StressFault {
            kind: Some(pb::stress_fault::Kind::Memory(pb::MemoryStress {
                size: Some(match size {
                    MemorySize::Bytes(b) => pb::memory_stress::Size::Bytes(*b),
                    MemorySize::PercentOfLimit(p) => pb::memory_stress::Size::PercentOfLimit(*p),
                }),
                workers: *workers,
                oom_target: *oom_target,
            })),
        }),
        Fault::Process(ProcessFault::Kill { signal }) => Kind::Process(pb::ProcessFault {
            kind: Some(pb::process_fault::Kind::Kill(pb::Kill { signal: signal_name(*signal) })),
        }),
        Fault::Process(ProcessFault::Pause) => {
            Kind::Process(pb::ProcessFault { kind: Some(pb::process_fault::Kind::Pause(pb::Pause {})) })
        }
    };
    pb::Fault { kind: Some(kind) }
}

pub fn state_to_pb(s: State) -> pb::State {
    match s {
        State::Pending => pb::State::Pending,
        State::Injecting => pb::State::Injecting,
        State::Active => pb::State::Active,
        State::Recovering => pb::State::Recovering,
        State::Recovered => pb::State::Recovered,
        State::Failed => pb::State::Failed,
        State::Expired => pb::State::Expired,
    }
}

pub fn counters_to_pb(c: &Counters) -> pb::Counters {
    pb::Counters {
        packets_matched: c.packets_matched,
        packets_dropped: c.packets_dropped,
        packets_delayed: c.packets_delayed,
        stress_cpu_time_ns: c.stress_cpu_time_ns,
        stress_resident_bytes: c.stress_resident_bytes,
        oom_kills: c.oom_kills,
        processes_signalled: c.processes_signalled,
    }
}

pub fn experiment_to_pb(exp: &Experiment, now: std::time::SystemTime) -> pb::Experiment {
    pb::Experiment {
        id: exp.id.clone(),
        target: Some(target_to_pb(&exp.target)),
        fault: Some(fault_to_pb(&exp.fault)),
        state: state_to_pb(exp.state) as i32,
        reason: exp.reason.clone(),
        created_at: Some(timestamp_to_proto(exp.created_at)),
        duration: exp.duration.map(duration_to_proto),
        ends_at: exp.ends_at.map(timestamp_to_proto),
        remaining: if exp.state.is_terminal() { None } else { exp.remaining(now).map(duration_to_proto) },
        ended_at: exp.ended_at.map(timestamp_to_proto),
        counters: Some(counters_to_pb(&exp.counters)),
        forced: exp.forced,
        summary: summary(exp),
    }
}
