//! What a person reads: one line per experiment (`chaosctl list`, the
//! daemon's log) and the units in it.

use crate::{experiment::Experiment, spec::*};

pub fn signal_name(n: i32) -> String {
    nix::sys::signal::Signal::try_from(n)
        .map(|s| s.as_str().trim_start_matches("SIG").to_string())
        .unwrap_or_else(|_| n.to_string())
}

/// "25%", "0.5%", "0.0001%": two decimals, or as many as a small share
/// needs to show its first three significant digits (never "0%" for a
/// share that is not 0).
pub(crate) fn fmt_pct(p: f64) -> String {
    let decimals = if p > 0.0 && p < 0.01 { (2 - p.log10().floor() as i32).clamp(2, 20) as usize } else { 2 };
    let s = format!("{p:.decimals$}");
    s.trim_end_matches('0').trim_end_matches('.').to_string() + "%"
}

fn fmt_ports(label: &str, r: &[PortRange]) -> Option<String> {
    if r.is_empty() {
        return None;
    }
    let list: Vec<String> = r
        .iter()
        .map(|r| if r.first == r.last { r.first.to_string() } else { format!("{}-{}", r.first, r.last) })
        .collect();
    Some(format!("{label} {}", list.join(",")))
}

/// One line a person reads in `chaosctl list`.
pub fn summary(exp: &Experiment) -> String {
    let what = match &exp.fault {
        Fault::Network(n) => {
            let action = match &n.action {
                NetAction::Delay { latency, jitter, correlation, .. } => {
                    let mut s = format!("delay {latency:?}");
                    if !jitter.is_zero() {
                        s += &format!(" ±{jitter:?}");
                    }
                    if *correlation > 0.0 {
                        s += &format!(" (corr {})", fmt_pct(*correlation));
                    }
                    s
                }
                NetAction::Loss { percent, correlation } if *correlation > 0.0 => {
                    format!("loss {} (corr {})", fmt_pct(*percent), fmt_pct(*correlation))
                }
                NetAction::Loss { percent, .. } => format!("loss {}", fmt_pct(*percent)),
                NetAction::Partition => "partition".into(),
                NetAction::Bandwidth { rate_bps, .. } => format!("bandwidth {}", fmt_rate(*rate_bps)),
                NetAction::Duplicate { percent, .. } => format!("duplicate {}", fmt_pct(*percent)),
                NetAction::Corrupt { percent, .. } => format!("corrupt {}", fmt_pct(*percent)),
                NetAction::Reorder { percent, latency, .. } => {
                    format!("reorder {} (others {latency:?})", fmt_pct(*percent))
                }
            };
            let s = &n.selector;
            let mut parts = vec![action];
            if s.protocol != Protocol::All {
                parts.push(format!("{:?}", s.protocol).to_lowercase());
            }
            parts.extend(fmt_ports("port", &s.ports));
            parts.extend(fmt_ports("sport", &s.source_ports));
            parts.extend(fmt_ports("dport", &s.destination_ports));
            if !s.peers.is_empty() {
                parts.push(format!("peer {}", s.peers.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")));
            }
            if !s.devices.is_empty() {
                parts.push(format!("dev {}", s.devices.join(",")));
            }
            parts.push(format!("{:?}", s.direction).to_lowercase());
            parts.join(" ")
        }
        Fault::Stress(StressFault::Cpu { workers, load_percent }) => {
            format!("cpu {workers} worker(s) at {load_percent}%")
        }
        Fault::Stress(StressFault::Memory { size, workers, .. }) => match size {
            MemorySize::Bytes(b) => format!("memory {} in {workers} worker(s)", fmt_bytes(*b)),
            MemorySize::PercentOfLimit(p) => format!("memory {} of limit in {workers} worker(s)", fmt_pct(*p)),
        },
        Fault::Process(ProcessFault::Kill { signal }) => format!("kill SIG{}", signal_name(*signal)),
        Fault::Process(ProcessFault::Pause) => "pause".into(),
    };
    format!("{}: {what}", exp.target)
}

pub fn fmt_rate(bps: u64) -> String {
    match bps {
        b if b >= 1_000_000_000 && b % 1_000_000_000 == 0 => format!("{}gbit", b / 1_000_000_000),
        b if b >= 1_000_000 && b % 1_000_000 == 0 => format!("{}mbit", b / 1_000_000),
        b if b >= 1_000 && b % 1_000 == 0 => format!("{}kbit", b / 1_000),
        b => format!("{b}bit"),
    }
}

pub fn fmt_bytes(b: u64) -> String {
    const GI: u64 = 1 << 30;
    const MI: u64 = 1 << 20;
    const KI: u64 = 1 << 10;
    match b {
        b if b >= GI && b % GI == 0 => format!("{}GiB", b / GI),
        b if b >= MI && b % MI == 0 => format!("{}MiB", b / MI),
        b if b >= KI && b % KI == 0 => format!("{}KiB", b / KI),
        b => format!("{b}B"),
    }
}
