//! How experiments are shown: table rows, detail lines and JSON.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chaos_proto::chaosd::v1 as pb;
use serde_json::{Value, json};

use crate::output::{duration_json, human_duration};

pub fn state_name(s: pb::State) -> &'static str {
    match s {
        pb::State::Unspecified => "unknown",
        pb::State::Pending => "pending",
        pb::State::Injecting => "injecting",
        pb::State::Active => "active",
        pb::State::Recovering => "recovering",
        pb::State::Recovered => "recovered",
        pb::State::Failed => "failed",
        pb::State::Expired => "expired",
    }
}

fn remaining(e: &pb::Experiment) -> String {
    match e.remaining.as_ref().and_then(chaos_proto::duration_from_proto) {
        Some(d) => human_duration(d),
        None if e.duration.is_none() && matches!(e.state(), pb::State::Active) => "until recovered".into(),
        None => "-".into(),
    }
}

fn timestamp(t: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.as_ref().map(|t| UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32))
}

fn rfc3339(t: &Option<prost_types::Timestamp>) -> Value {
    match t {
        Some(t) => {
            let secs = t.seconds;
            let days = secs.div_euclid(86400);
            let rem = secs.rem_euclid(86400);
            let (y, m, d) = civil_from_days(days);
            Value::String(format!(
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
                rem / 3600,
                (rem % 3600) / 60,
                rem % 60,
                t.nanos / 1_000_000
            ))
        }
        None => Value::Null,
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn counters_text(c: &pb::Counters, fault: &str) -> String {
    match fault {
        "network" => {
            format!("matched {} dropped {} delayed {}", c.packets_matched, c.packets_dropped, c.packets_delayed)
        }
        "stress" => format!(
            "cpu {:.1}s rss {} oom-kills {}",
            c.stress_cpu_time_ns as f64 / 1e9,
            crate::output::human_bytes(c.stress_resident_bytes),
            c.oom_kills
        ),
        _ => format!("signalled {}", c.processes_signalled),
    }
}

fn fault_family(e: &pb::Experiment) -> &'static str {
    match e.fault.as_ref().and_then(|f| f.kind.as_ref()) {
        Some(pb::fault::Kind::Network(_)) => "network",
        Some(pb::fault::Kind::Stress(_)) => "stress",
        _ => "process",
    }
}

pub fn table(list: &[pb::Experiment]) -> Vec<Vec<String>> {
    let mut rows = vec![vec!["ID".into(), "STATE".into(), "REMAINING".into(), "COUNTERS".into(), "EXPERIMENT".into()]];
    for e in list {
        let counters = e.counters.unwrap_or_default();
        rows.push(vec![
            e.id.clone(),
            state_name(e.state()).into(),
            remaining(e),
            counters_text(&counters, fault_family(e)),
            e.summary.clone(),
        ]);
    }
    rows
}

pub fn details(e: &pb::Experiment) -> Vec<Vec<String>> {
    let c = e.counters.unwrap_or_default();
    let mut rows: Vec<Vec<String>> = vec![
        vec!["id".into(), e.id.clone()],
        vec!["experiment".into(), e.summary.clone()],
        vec!["state".into(), state_name(e.state()).into()],
    ];
    if !e.reason.is_empty() {
        rows.push(vec!["reason".into(), e.reason.clone()]);
    }
    let now = SystemTime::now();
    if let Some(t) = timestamp(&e.created_at) {
        rows.push(vec!["created".into(), format!("{} ago", human_duration(now.duration_since(t).unwrap_or_default()))]);
    }
    let dur = e.duration.as_ref().and_then(chaos_proto::duration_from_proto);
    rows.push(vec!["duration".into(), dur.map(human_duration).unwrap_or_else(|| "until recovered".into())]);
    rows.push(vec!["remaining".into(), remaining(e)]);
    if let Some(t) = timestamp(&e.ended_at) {
        rows.push(vec!["ended".into(), format!("{} ago", human_duration(now.duration_since(t).unwrap_or_default()))]);
    }
    if e.forced {
        rows.push(vec!["forced".into(), "yes".into()]);
    }
    match fault_family(e) {
        "network" => {
            rows.push(vec!["packets matched".into(), c.packets_matched.to_string()]);
            rows.push(vec!["packets dropped".into(), c.packets_dropped.to_string()]);
            rows.push(vec!["packets delayed".into(), c.packets_delayed.to_string()]);
        }
        "stress" => {
            rows.push(vec!["stressor cpu time".into(), format!("{:.2}s", c.stress_cpu_time_ns as f64 / 1e9)]);
            rows.push(vec!["stressor resident".into(), crate::output::human_bytes(c.stress_resident_bytes)]);
            rows.push(vec!["oom kills".into(), c.oom_kills.to_string()]);
        }
        _ => rows.push(vec!["processes signalled".into(), c.processes_signalled.to_string()]),
    }
    rows
}

pub fn to_json(e: &pb::Experiment) -> Value {
    let c = e.counters.unwrap_or_default();
    json!({
        "id": e.id,
        "summary": e.summary,
        "state": state_name(e.state()),
        "reason": e.reason,
        "target": target_json(&e.target),
        "fault": fault_family(e),
        "fault_name": fault_name(e),
        "created_at": rfc3339(&e.created_at),
        "duration": duration_json(&e.duration),
        "ends_at": rfc3339(&e.ends_at),
        "remaining": duration_json(&e.remaining),
        "ended_at": rfc3339(&e.ended_at),
        "forced": e.forced,
        "counters": {
            "packets_matched": c.packets_matched,
            "packets_dropped": c.packets_dropped,
            "packets_delayed": c.packets_delayed,
            "stress_cpu_time_ns": c.stress_cpu_time_ns,
            "stress_resident_bytes": c.stress_resident_bytes,
            "oom_kills": c.oom_kills,
            "processes_signalled": c.processes_signalled,
        },
    })
}

fn fault_name(e: &pb::Experiment) -> &'static str {
    use pb::{fault::Kind, network_action::Kind as N};
    match e.fault.as_ref().and_then(|f| f.kind.as_ref()) {
        Some(Kind::Network(n)) => match n.action.as_ref().and_then(|a| a.kind.as_ref()) {
            Some(N::Delay(_)) => "delay",
            Some(N::Loss(_)) => "loss",
            Some(N::Partition(_)) => "partition",
            Some(N::Bandwidth(_)) => "bandwidth",
            Some(N::Duplicate(_)) => "duplicate",
            Some(N::Corrupt(_)) => "corrupt",
            Some(N::Reorder(_)) => "reorder",
            None => "network",
        },
        Some(Kind::Stress(s)) => match s.kind {
            Some(pb::stress_fault::Kind::Cpu(_)) => "cpu",
            _ => "memory",
        },
        Some(Kind::Process(p)) => match p.kind {
            Some(pb::process_fault::Kind::Kill(_)) => "kill",
            _ => "pause",
        },
        None => "unknown",
    }
}

fn target_json(t: &Option<pb::Target>) -> Value {
    use pb::target::Kind;
    match t.as_ref().and_then(|t| t.kind.as_ref()) {
        Some(Kind::Pid(p)) => json!({ "pid": p }),
        Some(Kind::NetnsName(n)) => json!({ "netns": n }),
        Some(Kind::NetnsPath(p)) => json!({ "netns_path": p }),
        Some(Kind::CgroupPath(p)) => json!({ "cgroup": p }),
        Some(Kind::Host(_)) => json!({ "host": true }),
        Some(Kind::ProcessName(n)) => json!({ "name": n }),
        None => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_as_rfc3339() {
        let t = Some(prost_types::Timestamp { seconds: 1_795_000_000, nanos: 5_000_000 });
        assert_eq!(rfc3339(&t), Value::String("2026-11-18T11:06:40.005Z".into()));
    }
}
