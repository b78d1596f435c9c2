//! Wire types (chaosd.v1) to the daemon's validated types. Every check that
//! needs no live system happens here, so a bad request is refused before
//! anything is journaled or touched. The way back to the wire is `wire.rs`,
//! what a person reads is `display.rs`.

use std::{path::PathBuf, str::FromStr, time::Duration};

use chaos_proto::{chaosd::v1 as pb, duration_from_proto};
use ipnet::IpNet;

use crate::{error::ApiError, spec::*};

/// Longest delay a fault may add: more is a typo, not an experiment.
pub const MAX_LATENCY: Duration = Duration::from_secs(60);
/// Longest experiment duration.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::InvalidArgument(msg.into())
}

pub fn target_from_pb(t: Option<pb::Target>) -> Result<Target, ApiError> {
    use pb::target::Kind;
    let kind = t
        .and_then(|t| t.kind)
        .ok_or_else(|| bad("no target: give --pid, --netns, --netns-path, --cgroup, --name or --host"))?;
    Ok(match kind {
        Kind::Pid(0) => return Err(bad("pid 0 is not a process: give the pid of the target process")),
        Kind::Pid(p) => Target::Pid(p),
        Kind::NetnsName(n) => {
            if n.is_empty() || n.contains('/') || n == "." || n == ".." {
                return Err(bad(format!(
                    "invalid netns name '{n}': use the name shown by `ip netns list`, or --netns-path for a path"
                )));
            }
            Target::NetnsName(n)
        }
        Kind::NetnsPath(p) => {
            let p = PathBuf::from(p);
            if !p.is_absolute() {
                return Err(bad(format!("netns path '{}' must be absolute (e.g. /proc/PID/ns/net)", p.display())));
            }
            Target::NetnsPath(p)
        }
        Kind::CgroupPath(p) => {
            let path = PathBuf::from(&p);
            let under =
                path.starts_with("/sys/fs/cgroup") && path.components().all(|c| c != std::path::Component::ParentDir);
            if !under {
                return Err(bad(format!("cgroup path '{p}' must be a directory under /sys/fs/cgroup (no '..')")));
            }
            Target::Cgroup(path)
        }
        Kind::Host(_) => Target::Host,
        Kind::ProcessName(n) => {
            if n.is_empty() || n.len() > 15 {
                return Err(bad(format!("process name '{n}' must be 1 to 15 characters (the kernel's comm)")));
            }
            Target::ProcessName(n)
        }
    })
}

/// The smallest non-zero share of packets the datapath can apply: the BPF
/// loss threshold and netem's probabilities are fractions of 2^32, so one
/// packet in 2^32 (about 0.0000000233%). A smaller share would become 0 and
/// do nothing while listed as a fault.
pub const MIN_PACKET_PERCENT: f64 = 100.0 / 4_294_967_296.0;

/// `MIN_PACKET_PERCENT` as written in messages: rounded up, so that the
/// value shown is itself accepted.
const MIN_PACKET_PERCENT_TEXT: &str = "0.0000000233";

/// A share of packets that the datapath turns into a 32-bit probability.
fn packet_percent(what: &str, v: f64, allow_zero: bool) -> Result<f64, ApiError> {
    let v = percent(what, v, allow_zero)?;
    if v != 0.0 && v < MIN_PACKET_PERCENT {
        let zero = if allow_zero { "give 0 for none, or" } else { "give" };
        return Err(bad(format!(
            "{what} {} is below the smallest share chaosd can apply, {MIN_PACKET_PERCENT_TEXT}% \
             (one packet in 2^32): {zero} at least {MIN_PACKET_PERCENT_TEXT}",
            fmt_number(v)
        )));
    }
    Ok(v)
}

fn percent(what: &str, v: f64, allow_zero: bool) -> Result<f64, ApiError> {
    let ok = v.is_finite() && v <= 100.0 && (if allow_zero { v >= 0.0 } else { v > 0.0 });
    let v_text = fmt_number(v);
    if ok {
        Ok(v)
    } else if allow_zero {
        Err(bad(format!("{what} {v_text} is outside 0..100")))
    } else {
        Err(bad(format!("{what} {v_text} must be above 0 and at most 100")))
    }
}

/// A number as the user may have typed it: "25", "0.5", "1e-300" (plain
/// decimals would print 300 zeros).
fn fmt_number(v: f64) -> String {
    if v != 0.0 && v.is_finite() && (v.abs() < 1e-4 || v.abs() >= 1e15) { format!("{v:e}") } else { format!("{v}") }
}

fn latency(what: &str, d: Option<&prost_types::Duration>, required: bool) -> Result<Duration, ApiError> {
    let Some(d) = d else {
        return if required {
            Err(bad(format!("{what} is required (e.g. --latency 100ms)")))
        } else {
            Ok(Duration::ZERO)
        };
    };
    let d = wire_duration(what, d)?;
    if required && d.is_zero() {
        return Err(bad(format!("{what} must be above 0")));
    }
    if d > MAX_LATENCY {
        return Err(bad(format!("{what} {d:?} is absurd: at most {}s", MAX_LATENCY.as_secs())));
    }
    Ok(d)
}

fn ports(what: &str, ranges: &[pb::PortRange]) -> Result<Vec<PortRange>, ApiError> {
    ranges
        .iter()
        .map(|r| {
            for p in [r.first, r.last] {
                if p == 0 || p > 65535 {
                    return Err(bad(format!("{what} {p} is not a port: ports are 1..65535")));
                }
            }
            if r.first > r.last {
                return Err(bad(format!("{what} range {}-{} is inverted: write it low-high", r.first, r.last)));
            }
            Ok(PortRange { first: r.first as u16, last: r.last as u16 })
        })
        .collect()
}

fn selector_from_pb(s: Option<pb::Selector>) -> Result<Selector, ApiError> {
    let s = s.unwrap_or_default();
    for d in &s.devices {
        if d.is_empty() || d.len() > 15 || d.contains('/') || d.contains(char::is_whitespace) {
            return Err(bad(format!("invalid device name '{d}'")));
        }
    }
    let peers = s
        .peers
        .iter()
        .map(|p| {
            let net = IpNet::from_str(p).or_else(|_| std::net::IpAddr::from_str(p).map(IpNet::from)).map_err(|_| {
                bad(format!("malformed peer '{p}': give a CIDR such as 10.0.0.0/24 or fd00::/64, or an address"))
            })?;
            Ok(net.trunc())
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Selector {
        devices: s.devices.clone(),
        protocol: match s.protocol() {
            pb::Protocol::Unspecified | pb::Protocol::All => Protocol::All,
            pb::Protocol::Tcp => Protocol::Tcp,
            pb::Protocol::Udp => Protocol::Udp,
            pb::Protocol::Icmp => Protocol::Icmp,
        },
        ports: ports("port", &s.ports)?,
        source_ports: ports("source port", &s.source_ports)?,
        destination_ports: ports("destination port", &s.destination_ports)?,
        peers,
        direction: match s.direction() {
            pb::Direction::Unspecified | pb::Direction::Egress => Direction::Egress,
            pb::Direction::Ingress => Direction::Ingress,
            pb::Direction::Both => Direction::Both,
        },
    })
}

fn action_from_pb(a: Option<pb::NetworkAction>) -> Result<NetAction, ApiError> {
    use pb::network_action::Kind;
    let kind = a
        .and_then(|a| a.kind)
        .ok_or_else(|| bad("no network action: delay, loss, partition, bandwidth, duplicate, corrupt or reorder"))?;
    Ok(match kind {
        Kind::Delay(d) => {
            let jitter = latency("jitter", d.jitter.as_ref(), false)?;
            let no_latency =
                d.latency.is_none() || d.latency.as_ref().and_then(duration_from_proto).is_some_and(|l| l.is_zero());
            if no_latency && !jitter.is_zero() {
                return Err(bad("jitter without latency: give --latency too (jitter varies around it)"));
            }
            let latency = latency("latency", d.latency.as_ref(), true)?;
            let distribution = match d.distribution() {
                pb::Distribution::Unspecified => None,
                pb::Distribution::Uniform => Some(Distribution::Uniform),
                pb::Distribution::Normal => Some(Distribution::Normal),
                pb::Distribution::Pareto => Some(Distribution::Pareto),
                pb::Distribution::Paretonormal => Some(Distribution::ParetoNormal),
            };
            if distribution.is_some() && jitter.is_zero() {
                return Err(bad("a delay distribution needs --jitter"));
            }
            NetAction::Delay {
                latency,
                jitter,
                correlation: packet_percent("correlation", d.correlation_percent, true)?,
                distribution,
            }
        }
        Kind::Loss(l) => NetAction::Loss {
            percent: packet_percent("loss percent", l.percent, false)?,
            correlation: packet_percent("correlation", l.correlation_percent, true)?,
        },
        Kind::Partition(_) => NetAction::Partition,
        Kind::Bandwidth(b) => {
            if b.rate_bits_per_second < 8_000 {
                return Err(bad(format!("rate {} bit/s is below the minimum 8kbit", b.rate_bits_per_second)));
            }
            if b.rate_bits_per_second > 400_000_000_000 {
                return Err(bad(format!("rate {} bit/s is absurd: at most 400gbit", b.rate_bits_per_second)));
            }
            NetAction::Bandwidth { rate_bps: b.rate_bits_per_second, burst_bytes: b.burst_bytes }
        }
        Kind::Duplicate(d) => NetAction::Duplicate {
            percent: packet_percent("duplicate percent", d.percent, false)?,
            correlation: packet_percent("correlation", d.correlation_percent, true)?,
        },
        Kind::Corrupt(c) => NetAction::Corrupt {
            percent: packet_percent("corrupt percent", c.percent, false)?,
            correlation: packet_percent("correlation", c.correlation_percent, true)?,
        },
        Kind::Reorder(r) => NetAction::Reorder {
            percent: packet_percent("reorder percent", r.percent, false)?,
            correlation: packet_percent("correlation", r.correlation_percent, true)?,
            latency: latency("reorder latency (the delay of the packets not sent at once)", r.latency.as_ref(), true)?,
        },
    })
}

/// Parses "KILL", "SIGKILL", "kill" or "9".
pub fn parse_signal(s: &str) -> Result<i32, ApiError> {
    if s.is_empty() {
        return Ok(libc::SIGKILL);
    }
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(bad(format!("signal {n} does not exist: signals are 1..64")))
        };
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    nix::sys::signal::Signal::from_str(&name)
        .map(|s| s as i32)
        .map_err(|_| bad(format!("unknown signal '{s}': use a name such as KILL, TERM, INT, HUP or a number")))
}

pub fn fault_from_pb(f: Option<pb::Fault>, target: &Target) -> Result<Fault, ApiError> {
    use pb::fault::Kind;
    let kind = f.and_then(|f| f.kind).ok_or_else(|| bad("no fault: network, stress or process"))?;
    let fault = match kind {
        Kind::Network(n) => {
            let fault = NetworkFault { selector: selector_from_pb(n.selector)?, action: action_from_pb(n.action)? };
            // The classifier's rule is a pure function of the request: one
            // that cannot be built is refused here, before anything is
            // journaled or a rule slot is taken.
            crate::net::rules::compile(&fault, 0, 0).map_err(|e| bad(e.to_string()))?;
            Fault::Network(fault)
        }
        Kind::Stress(s) => {
            use pb::stress_fault::Kind as S;
            match s.kind.ok_or_else(|| bad("no stress kind: cpu or memory"))? {
                S::Cpu(c) => {
                    if c.workers == 0 {
                        return Err(bad("workers must be at least 1"));
                    }
                    if c.load_percent == 0 || c.load_percent > 100 {
                        return Err(bad(format!(
                            "load {} is outside 1..100 (percent of one CPU per worker)",
                            c.load_percent
                        )));
                    }
                    Fault::Stress(StressFault::Cpu { workers: c.workers, load_percent: c.load_percent })
                }
                S::Memory(m) => {
                    if m.workers == 0 {
                        return Err(bad("workers must be at least 1"));
                    }
                    use pb::memory_stress::Size;
                    let size = match m
                        .size
                        .ok_or_else(|| bad("memory size is required (e.g. --size 512MiB or --size 90%)"))?
                    {
                        Size::Bytes(0) => return Err(bad("memory size must be above 0")),
                        Size::Bytes(b) => MemorySize::Bytes(b),
                        Size::PercentOfLimit(p) => {
                            MemorySize::PercentOfLimit(percent("memory size percent", p, false)?)
                        }
                    };
                    Fault::Stress(StressFault::Memory { size, workers: m.workers, oom_target: m.oom_target })
                }
            }
        }
        Kind::Process(p) => {
            use pb::process_fault::Kind as P;
            match p.kind.ok_or_else(|| bad("no process fault kind: kill or pause"))? {
                P::Kill(k) => Fault::Process(ProcessFault::Kill { signal: parse_signal(&k.signal)? }),
                P::Pause(_) => Fault::Process(ProcessFault::Pause),
            }
        }
    };
    let fits = matches!(
        (&fault, target),
        (Fault::Network(_), Target::Pid(_) | Target::NetnsName(_) | Target::NetnsPath(_) | Target::Host)
            | (Fault::Stress(_), Target::Pid(_) | Target::Cgroup(_) | Target::Host)
            | (Fault::Process(_), Target::Pid(_) | Target::Cgroup(_) | Target::ProcessName(_))
    );
    if !fits {
        let allowed = match fault {
            Fault::Network(_) => "--pid, --netns, --netns-path or --host",
            Fault::Stress(_) => "--pid, --cgroup or --host",
            Fault::Process(_) => "--pid, --name or --cgroup",
        };
        return Err(bad(format!("a {} fault cannot target {target}: use {allowed}", fault.name())));
    }
    Ok(fault)
}

/// The shortest experiment: the engine ends experiments on a 100 ms tick
/// and the kernel objects are set up in milliseconds, so a shorter fault
/// would be over before it acted.
pub const MIN_DURATION: Duration = Duration::from_millis(1);

/// A wire duration, refusing negative and malformed ones.
fn wire_duration(what: &str, d: &prost_types::Duration) -> Result<Duration, ApiError> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(bad(format!("{what} must not be negative")));
    }
    duration_from_proto(d)
        .ok_or_else(|| bad(format!("{what} is malformed: {} nanoseconds is not a fraction of a second", d.nanos)))
}

pub fn duration_from_pb(d: Option<&prost_types::Duration>) -> Result<Option<Duration>, ApiError> {
    let Some(d) = d else { return Ok(None) };
    let d = wire_duration("duration", d)?;
    if d.is_zero() {
        return Err(bad("duration 0 would end the fault at once: omit --duration to keep it until recovered"));
    }
    if d < MIN_DURATION {
        return Err(bad(format!(
            "duration {d:?} is too short: the smallest duration is 1ms (omit --duration to keep the fault until recovered)"
        )));
    }
    if d > MAX_DURATION {
        return Err(bad(format!(
            "duration {} is longer than the maximum of 7 days: give at most 7d, or omit --duration to keep the \
             fault until recovered",
            fmt_long_duration(d)
        )));
    }
    Ok(Some(d))
}

/// "8d", "30d 12h", "1000000d": whole days and hours, for durations too
/// long for `Debug`'s seconds to be read at a glance.
fn fmt_long_duration(d: Duration) -> String {
    let (days, hours) = (d.as_secs() / 86_400, d.as_secs() % 86_400 / 3600);
    match (days, hours) {
        (0, _) => format!("{}s", d.as_secs()),
        (_, 0) => format!("{days}d"),
        _ => format!("{days}d {hours}h"),
    }
}

#[cfg(test)]
mod tests;
