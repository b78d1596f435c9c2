//! Judging a case from what was measured. A verdict is `pass` only when
//! every criterion was measured and met; missing evidence gives `unknown`,
//! a breached criterion `fail` (which wins over unknown, as in Jepsen).

use mqtt_workload::{Summary, Window, stats::Latency};
use serde::Serialize;

use super::exec::CaseRun;
use super::plan::Thresholds;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
    Unknown,
    /// The plan asks for a fault chaosd does not have yet.
    NotRun,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Unknown => "unknown",
            Verdict::NotRun => "not run",
        }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct PhaseStats {
    pub sent: u64,
    pub delivered: u64,
    pub delivered_per_s: f64,
    /// Latency of the messages sent in the phase.
    pub latency_ms: Option<Latency>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Metrics {
    pub sent: [u64; 3],
    pub expected: [u64; 3],
    pub received: [u64; 3],
    pub lost: [u64; 3],
    pub duplicates: [u64; 3],
    pub out_of_order: [u64; 3],
    pub before: PhaseStats,
    pub during: PhaseStats,
    pub after: PhaseStats,
    /// Delivered msgs/s during the fault over the baseline's.
    pub throughput_ratio: Option<f64>,
    /// Recovery time, seconds from the end of the fault (a kill: from the kill).
    pub rto_s: Option<f64>,
    pub rto_note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub name: String,
    pub fault: String,
    pub verdict: Verdict,
    pub reasons: Vec<String>,
    pub thresholds: Thresholds,
    pub metrics: Metrics,
    pub run: CaseRun,
    /// The workload's seconds from the start of the baseline to the end of
    /// the recovery window.
    pub windows: Vec<Window>,
}

/// Whole seconds inside [a, b).
fn secs(a: f64, b: f64) -> std::ops::Range<u64> {
    (a.max(0.0).ceil() as u64)..(b.max(0.0).floor() as u64)
}

fn phase(s: &Summary, r: std::ops::Range<u64>) -> PhaseStats {
    let mut p = PhaseStats::default();
    let mut lat: Vec<u32> = Vec::new();
    let n = r.end.saturating_sub(r.start);
    for t in r {
        if let Some(w) = s.windows.get(t as usize) {
            p.sent += w.sent.iter().sum::<u64>();
            p.delivered += w.received.iter().sum::<u64>();
        }
        if let Some(l) = s.latency_by_send_second.get(t as usize) {
            lat.extend_from_slice(l);
        }
    }
    p.delivered_per_s = if n > 0 { p.delivered as f64 / n as f64 } else { 0.0 };
    p.latency_ms = (!lat.is_empty()).then(|| Latency::of(&mut lat));
    p
}

pub fn judge(run: CaseRun, th: Thresholds, s: &Summary) -> CaseResult {
    let fault = run.faults.iter().map(|f| format!("{} on {}", f.kind, f.node)).collect::<Vec<_>>().join(" + ");
    let mut m = Metrics::default();
    let span = (run.baseline.0.max(0.0).floor() as u64)..(run.recovery.1.max(0.0).floor() as u64);
    let windows: Vec<Window> = s.windows.iter().filter(|w| span.contains(&w.t)).cloned().collect();
    for w in &windows {
        for q in 0..3 {
            m.sent[q] += w.sent[q];
            m.expected[q] += w.expected[q];
            m.received[q] += w.received[q];
            m.lost[q] += w.lost.map_or(0, |l| l[q]);
            m.duplicates[q] += w.duplicates[q];
            m.out_of_order[q] += w.out_of_order[q];
        }
    }
    m.before = phase(s, secs(run.baseline.0, run.baseline.1));
    m.during = phase(s, secs(run.fault.0, run.fault.1));
    m.after = phase(s, secs(run.recovery.0, run.recovery.1));
    if m.before.delivered_per_s > 0.0 && run.fault.1 - run.fault.0 >= 1.0 {
        m.throughput_ratio = Some(m.during.delivered_per_s / m.before.delivered_per_s);
    }
    let band = th.recovery_band.unwrap_or(0.8);
    let (rto, note) = rto(&run, s, band * m.before.delivered_per_s);
    m.rto_s = rto;
    m.rto_note = note;

    let mut fails = Vec::new();
    let mut unknowns = Vec::new();
    let mut not_run = Vec::new();
    if let Some(a) = &run.aborted {
        unknowns.push(a.clone());
    }
    for f in &run.faults {
        match &f.not_run {
            Some(w) if w.starts_with("not run") => not_run.push(format!("{} on {}: {w}", f.kind, f.node)),
            Some(w) => unknowns.push(format!("{} on {}: {w}", f.kind, f.node)),
            None => {}
        }
        if let Some(w) = &f.no_evidence {
            unknowns.push(format!("{} on {}: {w}", f.kind, f.node));
        }
    }
    if run.aborted.is_none() && run.faults.iter().all(|f| f.injected_at.is_none()) {
        // Nothing was injected: the measurements say nothing about a fault.
        let verdict = if not_run.is_empty() { Verdict::Unknown } else { Verdict::NotRun };
        let mut reasons = not_run;
        reasons.extend(unknowns);
        if reasons.is_empty() {
            reasons.push("no fault was injected".into());
        }
        return CaseResult {
            name: run.name.clone(),
            fault,
            verdict,
            reasons,
            thresholds: th,
            metrics: m,
            run,
            windows,
        };
    }
    if m.before.sent == 0 {
        unknowns.push("nothing was sent during the baseline".into());
    } else if m.before.delivered == 0 {
        unknowns.push("nothing was delivered during the baseline".into());
    }
    if run.aborted.is_none() && m.after.sent == 0 {
        unknowns.push("nothing was sent during the recovery window".into());
    }
    for n in &run.nodes_down_at_end {
        fails.push(format!("node {n} was not running at the end of the recovery window"));
    }
    let limits = [th.max_lost_qos0, th.max_lost_qos1, th.max_lost_qos2];
    for (q, limit) in limits.iter().enumerate() {
        if let Some(max) = *limit
            && m.lost[q] > max
        {
            fails.push(format!("lost {} QoS {q} message(s) (max {max})", m.lost[q]));
        }
    }
    if let Some(max) = th.max_duplicates_qos2
        && m.duplicates[2] > max
    {
        fails.push(format!("{} QoS 2 duplicate(s) (max {max})", m.duplicates[2]));
    }
    if let Some(max) = th.max_p99_during_ms {
        match &m.during.latency_ms {
            Some(l) if l.p99 > max => fails.push(format!("p99 during the fault {:.1} ms > {max} ms", l.p99)),
            Some(_) => {}
            None if m.during.sent > 0 && m.lost.iter().sum::<u64>() > 0 => {
                fails.push(format!("nothing sent during the fault arrived (p99 criterion {max} ms)"))
            }
            None => unknowns.push("no latency measured during the fault (nothing sent arrived)".into()),
        }
    }
    if let Some(min) = th.min_throughput_ratio {
        match m.throughput_ratio {
            Some(r) if r < min => fails.push(format!(
                "throughput during the fault {:.0}% of the baseline (min {:.0}%)",
                r * 100.0,
                min * 100.0
            )),
            Some(_) => {}
            None => unknowns.push("no baseline throughput to compare with".into()),
        }
    }
    if let Some(max) = th.max_recovery {
        match m.rto_s {
            Some(r) if r > max.as_secs_f64() => {
                fails.push(format!("recovery took {r:.0} s (max {:.0} s)", max.as_secs_f64()))
            }
            Some(_) => {}
            None if m.before.delivered_per_s <= 0.0 => {
                unknowns.push(format!("recovery not measurable: {}", m.rto_note))
            }
            None => fails.push(format!("did not recover: {}", m.rto_note)),
        }
    }
    let (verdict, reasons) = if !fails.is_empty() {
        (Verdict::Fail, fails.into_iter().chain(unknowns).collect())
    } else if !unknowns.is_empty() {
        (Verdict::Unknown, unknowns)
    } else {
        let mut why = vec![format!("lost QoS1/2 {}/{}, QoS2 duplicates {}", m.lost[1], m.lost[2], m.duplicates[2])];
        if let Some(r) = m.rto_s {
            why.push(format!("recovered in {r:.0} s"));
        }
        (Verdict::Pass, why)
    };
    CaseResult { name: run.name.clone(), fault, verdict, reasons, thresholds: th, metrics: m, run, windows }
}

/// Recovery time: from the end of the fault (a kill: the kill) to the first
/// second after which delivery stays at or above `floor` msgs/s and every
/// QoS 1/2 message sent during the fault has arrived.
fn rto(run: &CaseRun, s: &Summary, floor: f64) -> (Option<f64>, String) {
    let kill = run.faults.iter().filter(|f| f.kind == "kill").filter_map(|f| f.injected_at).reduce(f64::min);
    let from = kill.unwrap_or(run.fault.1);
    if floor <= 0.0 {
        return (None, "no baseline delivery rate to recover to".into());
    }
    let mut arrived = from;
    for t in (run.fault.0.max(0.0).floor() as u64)..(run.fault.1.max(0.0).ceil() as u64) {
        let Some(w) = s.windows.get(t as usize) else { continue };
        let lost = w.lost.map_or(0, |l| l[1] + l[2]);
        if lost > 0 {
            return (None, format!("{lost} QoS 1/2 message(s) sent during the fault never arrived"));
        }
        for a in w.last_arrival_of_sent[1..].iter().flatten() {
            arrived = arrived.max(*a);
        }
    }
    let end = run.recovery.1.max(0.0).floor() as u64;
    let mut back: Option<u64> = None;
    for t in (from.max(0.0).floor() as u64)..end {
        let ok = s.windows.get(t as usize).is_some_and(|w| w.received.iter().sum::<u64>() as f64 >= floor);
        match (ok, back) {
            (true, None) => back = Some(t),
            (false, _) => back = None,
            _ => {}
        }
    }
    match back {
        Some(t) => {
            let at = (t as f64).max(arrived);
            (Some((at - from).max(0.0)), String::new())
        }
        None => {
            (None, format!("delivery did not stay at or above {floor:.0} msgs/s until the end of the recovery window"))
        }
    }
}

/// 0 all pass, 1 any fail, 2 any unknown / not run (fail wins).
pub fn exit_code(results: &[CaseResult]) -> u8 {
    if results.iter().any(|r| r.verdict == Verdict::Fail) {
        1
    } else if results.iter().all(|r| r.verdict == Verdict::Pass) && !results.is_empty() {
        0
    } else {
        2
    }
}
