//! Meaning checks of a plan, all before anything starts: every problem is
//! reported with the case (and fault line) it is in.

use std::collections::HashSet;

use super::plan::{Action, Clients, Plan, Sut, Thresholds};
use crate::parse;

/// Names of the nodes the SUT will have.
pub fn node_names(plan: &Plan) -> Vec<String> {
    match &plan.sut {
        Sut::Local { nodes, .. } => (1..=*nodes).map(|i| format!("n{i}")).collect(),
        Sut::Attach { nodes, .. } => nodes.iter().map(|n| n.name.clone()).collect(),
    }
}

fn pct(what: &str, v: f64, zero_ok: bool) -> Result<(), String> {
    let ok = v.is_finite() && v <= 100.0 && if zero_ok { v >= 0.0 } else { v > 0.0 };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {v} is out of range: give a percent {}",
            if zero_ok { "0..100" } else { "above 0, up to 100" }
        ))
    }
}

fn clients(what: &str, list: &[Clients], nodes: &[String]) -> Result<(), String> {
    if list.is_empty() {
        return Err(format!("workload: no {what}: add e.g. {what} = [{{ node = \"n1\", count = 2 }}]"));
    }
    for c in list {
        match (&c.node, &c.addr) {
            (Some(n), None) if !nodes.contains(n) => {
                return Err(format!("workload.{what}: node '{n}' is not in the SUT (nodes: {})", nodes.join(", ")));
            }
            (Some(_), None) => {}
            (None, Some(a)) if a.port() == 0 => return Err(format!("workload.{what}: address {a} has port 0")),
            (None, Some(_)) => {}
            _ => return Err(format!("workload.{what}: give either node = \"n1\" or addr = \"IP:PORT\", not both")),
        }
        if c.count == 0 {
            return Err(format!("workload.{what}: count is 0"));
        }
    }
    Ok(())
}

fn thresholds(where_: &str, t: &Thresholds) -> Result<(), String> {
    if let Some(r) = t.min_throughput_ratio
        && !(0.0..=1.0).contains(&r)
    {
        return Err(format!("{where_}: min_throughput_ratio {r} is out of range: give a fraction 0..1 (0.7 = 70%)"));
    }
    if let Some(b) = t.recovery_band
        && !(b > 0.0 && b <= 1.0)
    {
        return Err(format!("{where_}: recovery_band {b} is out of range: give a fraction above 0, up to 1"));
    }
    if let Some(p) = t.max_p99_during_ms
        && !(p.is_finite() && p >= 0.0)
    {
        return Err(format!("{where_}: max_p99_during_ms {p} must be a number of milliseconds >= 0"));
    }
    Ok(())
}

fn is_cidr(s: &str) -> bool {
    let (ip, len) = s.split_once('/').unwrap_or((s, ""));
    match ip.parse::<std::net::IpAddr>() {
        Ok(a) => len.is_empty() || len.parse::<u8>().is_ok_and(|l| l <= if a.is_ipv4() { 32 } else { 128 }),
        Err(_) => false,
    }
}

/// Every meaning error of the plan, or nothing.
pub fn check(plan: &Plan) -> Result<(), String> {
    let nodes = node_names(plan);
    match &plan.sut {
        Sut::Local { nodes: n, .. } if !(1..=9).contains(n) => {
            return Err(format!("sut: nodes = {n}: the local topology has 1 to 9 nodes"));
        }
        Sut::Attach { nodes: list, .. } => {
            if list.is_empty() {
                return Err("sut: attach needs at least one [[sut.node]]".into());
            }
            for n in list {
                if n.mqtt.port() == 0 {
                    return Err(format!("sut.node '{}': mqtt address {} has port 0", n.name, n.mqtt));
                }
            }
        }
        _ => {}
    }
    let w = &plan.workload;
    clients("publishers", &w.publishers, &nodes)?;
    clients("subscribers", &w.subscribers, &nodes)?;
    let mix = w.qos_mix;
    if mix.qos0 + mix.qos1 + mix.qos2 != 100 {
        return Err(format!(
            "workload.qos_mix adds up to {}, not 100: e.g. qos_mix = {{ qos0 = 20, qos1 = 60, qos2 = 20 }}",
            mix.qos0 + mix.qos1 + mix.qos2
        ));
    }
    if !(w.rate.is_finite() && w.rate > 0.0) {
        return Err(format!("workload.rate {} must be above 0 messages per second per publisher", w.rate));
    }
    if w.reconnect.initial.is_zero() || w.reconnect.max < w.reconnect.initial {
        return Err("workload.reconnect: initial must be above 0 and max at least initial".into());
    }
    thresholds("thresholds", &plan.thresholds)?;
    if plan.cases.is_empty() {
        return Err("the plan has no [[case]]".into());
    }
    let mut names = HashSet::new();
    for c in &plan.cases {
        let at = format!("case '{}'", c.name);
        if !names.insert(&c.name) {
            return Err(format!("{at}: two cases have this name"));
        }
        if c.fault_time.is_zero() || c.recovery.is_zero() || c.baseline.is_zero() {
            return Err(format!("{at}: baseline, fault_time and recovery must each be above 0"));
        }
        thresholds(&format!("{at} thresholds"), &c.thresholds)?;
        if c.faults.is_empty() {
            return Err(format!("{at}: no [[case.fault]]"));
        }
        for f in &c.faults {
            let at = format!("{at} (fault at line {})", f.line);
            if !(nodes.contains(&f.target) || f.target == "all" || f.target == "random") {
                return Err(format!(
                    "{at}: target '{}' is not in the SUT: give one of {}, \"all\" or \"random\"",
                    f.target,
                    nodes.join(", ")
                ));
            }
            if f.seed.is_some() && f.target != "random" {
                return Err(format!("{at}: seed is only for target = \"random\""));
            }
            if let Some(d) = f.duration
                && (d > c.fault_time || d.is_zero())
            {
                return Err(format!(
                    "{at}: duration {d:?} is longer than the case's fault_time {:?} (or 0): shorten it or raise \
                     fault_time",
                    c.fault_time
                ));
            }
            let net = f.action.is_network();
            if !net && (!f.ports.is_empty() || f.direction.is_some() || f.protocol.is_some() || !f.peers.is_empty()) {
                return Err(format!("{at}: ports, direction, protocol and peers are for network faults only"));
            }
            for p in &f.ports {
                if *p == 0 || *p > 65535 {
                    return Err(format!("{at}: port {p} is not a port: give 1..65535"));
                }
            }
            if let Some(d) = &f.direction
                && !matches!(d.as_str(), "egress" | "ingress" | "both")
            {
                return Err(format!("{at}: direction '{d}': expected egress, ingress or both"));
            }
            if let Some(p) = &f.protocol
                && !matches!(p.as_str(), "all" | "tcp" | "udp" | "icmp")
            {
                return Err(format!("{at}: protocol '{p}': expected all, tcp, udp or icmp"));
            }
            for p in &f.peers {
                if !nodes.contains(p) && !is_cidr(p) {
                    return Err(format!("{at}: peer '{p}' is neither a node of the SUT nor an IP/CIDR"));
                }
            }
            match &f.action {
                Action::Loss { percent, correlation }
                | Action::Duplicate { percent, correlation }
                | Action::Corrupt { percent, correlation } => {
                    pct(&format!("{at}: percent"), *percent, false)?;
                    pct(&format!("{at}: correlation"), *correlation, true)?;
                }
                Action::Reorder { percent, correlation, latency } => {
                    pct(&format!("{at}: percent"), *percent, false)?;
                    pct(&format!("{at}: correlation"), *correlation, true)?;
                    if latency.is_zero() || latency.as_secs() > 60 {
                        return Err(format!("{at}: latency must be above 0 and at most 60s"));
                    }
                }
                Action::Delay { latency, jitter, correlation } => {
                    pct(&format!("{at}: correlation"), *correlation, true)?;
                    if latency.is_zero() || latency.as_secs() > 60 || jitter.is_some_and(|j| j > *latency) {
                        return Err(format!("{at}: latency must be above 0, at most 60s, and at least the jitter"));
                    }
                }
                Action::Bandwidth { rate, .. } => {
                    let r = parse::rate(rate).map_err(|e| format!("{at}: rate: {e}"))?;
                    if r == 0 {
                        return Err(format!("{at}: rate is 0"));
                    }
                }
                Action::Cpu { workers, load } => {
                    if *workers == 0 || !(1..=100).contains(load) {
                        return Err(format!("{at}: cpu needs workers >= 1 and load 1..100 (percent of one CPU)"));
                    }
                }
                Action::Memory { size, workers } => {
                    parse::memory_size(size).map_err(|e| format!("{at}: size: {e}"))?;
                    if *workers == 0 {
                        return Err(format!("{at}: workers is 0"));
                    }
                }
                Action::Kill { signal } => {
                    if let Some(s) = signal
                        && s.is_empty()
                    {
                        return Err(format!("{at}: signal is empty: give e.g. KILL or TERM"));
                    }
                }
                Action::Partition | Action::Pause | Action::NotYet { .. } => {}
            }
        }
    }
    Ok(())
}
