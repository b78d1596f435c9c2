//! Plan faults to chaosd requests, and the requests' lifecycle.

use std::time::Duration;

use chaos_proto::chaosd::v1 as pb;
use chaos_proto::chaosd::v1::chaosd_client::ChaosdClient;
use tonic::transport::Channel;

use super::plan::{Action, Fault};
use super::sut::Node;
use crate::client::CliError;
use crate::parse;

/// Extra time chaosd keeps a fault beyond its planned end, so that it ends
/// it itself if the runner dies, without cutting a slow recovery short.
pub const MARGIN: Duration = Duration::from_secs(10);

fn proto_dur(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// The nodes a fault acts on.
pub fn targets<'a>(f: &Fault, nodes: &'a [Node]) -> Vec<&'a Node> {
    match f.target.as_str() {
        "all" => nodes.iter().collect(),
        "random" => {
            // splitmix64 of the seed: the same seed picks the same node.
            let mut z = f.seed.unwrap_or(0).wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            nodes.get((z % nodes.len().max(1) as u64) as usize).into_iter().collect()
        }
        name => nodes.iter().filter(|n| n.name == name).collect(),
    }
}

/// The request for one fault on one node, or why it cannot be made.
pub fn request(f: &Fault, node: &Node, all: &[Node], hold: Duration) -> Result<pb::InjectRequest, String> {
    use pb::network_action::Kind as N;
    // Stress needs a pid or a cgroup; kill and pause can also go by name.
    let pid_target = |by_name: bool| -> Result<pb::Target, String> {
        if let Some(p) = node.current_pid() {
            return Ok(pb::Target { kind: Some(pb::target::Kind::Pid(p)) });
        }
        if let Some(c) = &node.cgroup {
            return Ok(pb::Target { kind: Some(pb::target::Kind::CgroupPath(c.clone())) });
        }
        if let (true, Some(name)) = (by_name, &node.process) {
            return Ok(pb::Target { kind: Some(pb::target::Kind::ProcessName(name.clone())) });
        }
        Err(format!(
            "node {} has no known pid (pid file unreadable), cgroup{}",
            node.name,
            if by_name { " or process name" } else { "" }
        ))
    };
    let pct = |p: f64, c: f64| (p, c);
    let (target, kind) = if f.action.is_network() {
        // A node on a host of its own (its own chaosd, no netns) is that
        // host's namespace.
        let ns_target = match (&node.netns, node.own_chaosd) {
            (Some(ns), _) => pb::target::Kind::NetnsName(ns.clone()),
            (None, true) => pb::target::Kind::Host(pb::Host {}),
            (None, false) => {
                return Err(format!(
                    "node {} has no netns for network faults (name one, or the node's own chaosd)",
                    node.name
                ));
            }
        };
        let mut peers = Vec::new();
        for p in &f.peers {
            match all.iter().find(|n| &n.name == p).and_then(|n| n.ipv4.clone()) {
                Some(ip) => peers.push(format!("{ip}/32")),
                None => peers.push(p.clone()),
            }
        }
        let selector = pb::Selector {
            devices: vec![],
            protocol: match f.protocol.as_deref() {
                Some("tcp") => pb::Protocol::Tcp,
                Some("udp") => pb::Protocol::Udp,
                Some("icmp") => pb::Protocol::Icmp,
                _ => pb::Protocol::All,
            } as i32,
            ports: f.ports.iter().map(|p| pb::PortRange { first: *p, last: *p }).collect(),
            source_ports: vec![],
            destination_ports: vec![],
            peers,
            direction: match f.direction.as_deref() {
                Some("ingress") => pb::Direction::Ingress,
                Some("egress") => pb::Direction::Egress,
                _ => pb::Direction::Both,
            } as i32,
        };
        let action = match &f.action {
            Action::Loss { percent, correlation } => {
                let (percent, correlation_percent) = pct(*percent, *correlation);
                N::Loss(pb::Loss { percent, correlation_percent })
            }
            Action::Partition => N::Partition(pb::Partition {}),
            Action::Delay { latency, jitter, correlation } => N::Delay(pb::Delay {
                latency: Some(proto_dur(*latency)),
                jitter: jitter.map(proto_dur),
                correlation_percent: *correlation,
                distribution: 0,
            }),
            Action::Bandwidth { rate, burst } => {
                N::Bandwidth(pb::Bandwidth { rate_bits_per_second: parse::rate(rate)?, burst_bytes: *burst })
            }
            Action::Duplicate { percent, correlation } => {
                N::Duplicate(pb::Duplicate { percent: *percent, correlation_percent: *correlation })
            }
            Action::Corrupt { percent, correlation } => {
                N::Corrupt(pb::Corrupt { percent: *percent, correlation_percent: *correlation })
            }
            Action::Reorder { percent, correlation, latency } => N::Reorder(pb::Reorder {
                percent: *percent,
                correlation_percent: *correlation,
                latency: Some(proto_dur(*latency)),
            }),
            _ => unreachable!("is_network"),
        };
        (
            pb::Target { kind: Some(ns_target) },
            pb::fault::Kind::Network(pb::NetworkFault {
                selector: Some(selector),
                action: Some(pb::NetworkAction { kind: Some(action) }),
            }),
        )
    } else {
        let kind = match &f.action {
            Action::Cpu { workers, load } => pb::fault::Kind::Stress(pb::StressFault {
                kind: Some(pb::stress_fault::Kind::Cpu(pb::CpuStress { workers: *workers, load_percent: *load })),
            }),
            Action::Memory { size, workers } => pb::fault::Kind::Stress(pb::StressFault {
                kind: Some(pb::stress_fault::Kind::Memory(pb::MemoryStress {
                    size: Some(parse::memory_size(size)?),
                    workers: *workers,
                    oom_target: false,
                })),
            }),
            Action::Kill { signal } => pb::fault::Kind::Process(pb::ProcessFault {
                kind: Some(pb::process_fault::Kind::Kill(pb::Kill { signal: signal.clone().unwrap_or_default() })),
            }),
            Action::Pause => {
                pb::fault::Kind::Process(pb::ProcessFault { kind: Some(pb::process_fault::Kind::Pause(pb::Pause {})) })
            }
            other => return Err(format!("not run: chaosd has no such fault yet ({})", other.name())),
        };
        let by_name = matches!(f.action, Action::Kill { .. } | Action::Pause);
        (pid_target(by_name)?, kind)
    };
    Ok(pb::InjectRequest {
        target: Some(target),
        fault: Some(pb::Fault { kind: Some(kind) }),
        duration: Some(proto_dur(hold + MARGIN)),
        force: false,
    })
}

/// How long a call to chaosd may take before the runner counts it as
/// unreachable.
const CALL: Duration = Duration::from_secs(15);

fn late() -> String {
    format!("chaosd did not answer within {} s", CALL.as_secs())
}

pub async fn inject(c: &mut ChaosdClient<Channel>, req: pb::InjectRequest) -> Result<pb::Experiment, String> {
    match tokio::time::timeout(CALL, c.inject(req)).await {
        Ok(r) => r.map(|r| r.into_inner()).map_err(|s| CliError::from(s).message),
        Err(_) => Err(late()),
    }
}

/// Ends an experiment; an experiment already over is fetched instead.
pub async fn recover(c: &mut ChaosdClient<Channel>, id: &str) -> Result<pb::Experiment, String> {
    let req = pb::RecoverRequest { which: Some(pb::recover_request::Which::Id(id.into())) };
    match tokio::time::timeout(CALL, c.recover(req)).await {
        Ok(Ok(r)) if !r.get_ref().recovered.is_empty() => Ok(r.into_inner().recovered.remove(0)),
        Err(_) => Err(late()),
        _ => get(c, id).await,
    }
}

pub async fn get(c: &mut ChaosdClient<Channel>, id: &str) -> Result<pb::Experiment, String> {
    match tokio::time::timeout(CALL, c.get(pb::GetRequest { id: id.into() })).await {
        Ok(r) => r.map(|r| r.into_inner()).map_err(|s| CliError::from(s).message),
        Err(_) => Err(late()),
    }
}

pub fn counters_json(e: &pb::Experiment) -> serde_json::Value {
    crate::experiment::to_json(e)["counters"].clone()
}

/// Whether chaosd's counters show the fault acted; `Err` says why not.
pub fn evidence(a: &Action, e: &pb::Experiment) -> Result<(), String> {
    let c = e.counters.unwrap_or_default();
    if a.is_network() {
        if c.packets_matched == 0 {
            return Err(format!("the {} fault matched no packet (chaosd's counters are 0)", a.name()));
        }
    } else {
        match a {
            Action::Cpu { .. } if c.stress_cpu_time_ns == 0 => {
                return Err("the CPU stressor did not run (0 s of CPU time)".into());
            }
            Action::Memory { .. } if c.stress_resident_bytes == 0 && c.oom_kills == 0 => {
                return Err("the memory stressor held no memory".into());
            }
            Action::Kill { .. } | Action::Pause if c.processes_signalled == 0 => {
                return Err("chaosd signalled no process".into());
            }
            _ => {}
        }
    }
    Ok(())
}
