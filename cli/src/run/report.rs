//! The run's report: report.json (with its JSON Schema next to it),
//! report.md (verdict table and per-case detail) and a self-contained
//! report.html with one SVG chart per case.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::sut::Node;
use super::verdict::{CaseResult, Verdict};

pub const SCHEMA_VERSION: u32 = 1;
pub const SCHEMA: &str = include_str!("report.schema.json");

#[derive(Debug, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub plan: String,
    pub plan_file: String,
    pub started_unix_ms: u64,
    pub finished_unix_ms: u64,
    pub run_dir: String,
    /// pass, fail or unknown for the whole run.
    pub verdict: &'static str,
    pub exit_code: u8,
    pub nodes: Vec<Node>,
    pub workload: mqtt_workload::Spec,
    pub steady_state: SteadyState,
    pub totals: Option<[mqtt_workload::stats::QosReport; 3]>,
    /// Problems outside any one case (teardown, leftover faults).
    pub errors: Vec<String>,
    pub cases: Vec<CaseResult>,
}

#[derive(Debug, Serialize)]
pub struct SteadyState {
    pub reached: bool,
    pub detail: String,
}

pub fn overall(code: u8) -> &'static str {
    match code {
        0 => "pass",
        1 => "fail",
        _ => "unknown",
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

fn p99(l: &Option<mqtt_workload::stats::Latency>) -> Option<f64> {
    l.as_ref().map(|l| l.p99)
}

/// The verdict table in Markdown.
pub fn table(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "| case | fault | verdict | why | lost q0/q1/q2 | dups q2 | p99 ms before/during/after | throughput | RTO |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
    for c in &r.cases {
        let m = &c.metrics;
        let _ = writeln!(
            o,
            "| {} | {} | **{}** | {} | {}/{}/{} | {} | {} / {} / {} | {} | {} |",
            c.name,
            c.fault,
            c.verdict.as_str(),
            c.reasons.join("; ").replace('|', "\\|"),
            m.lost[0],
            m.lost[1],
            m.lost[2],
            m.duplicates[2],
            ms(p99(&m.before.latency_ms)),
            ms(p99(&m.during.latency_ms)),
            ms(p99(&m.after.latency_ms)),
            m.throughput_ratio.map_or("-".into(), |t| format!("{:.0}%", t * 100.0)),
            m.rto_s.map_or("-".into(), |s| format!("{s:.0} s")),
        );
    }
    o
}

pub fn markdown(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# chaosctl run: {} — {}\n", r.plan, r.verdict.to_uppercase());
    let _ = writeln!(o, "Plan `{}`, run directory `{}`, exit code {}.\n", r.plan_file, r.run_dir, r.exit_code);
    if !r.steady_state.reached {
        let _ = writeln!(o, "**The workload never reached a steady state:** {}\n", r.steady_state.detail);
    }
    o.push_str(&table(r));
    for e in &r.errors {
        let _ = writeln!(o, "\n**error:** {e}");
    }
    for c in &r.cases {
        let m = &c.metrics;
        let _ = writeln!(o, "\n## {} — {}\n", c.name, c.verdict.as_str());
        for why in &c.reasons {
            let _ = writeln!(o, "- {why}");
        }
        let _ = writeln!(
            o,
            "\nsent {:?}, expected {:?}, received {:?}, lost {:?}, duplicates {:?}, out of order {:?} (QoS 0/1/2)",
            m.sent, m.expected, m.received, m.lost, m.duplicates, m.out_of_order
        );
        let _ = writeln!(
            o,
            "\ndelivered msgs/s: before {:.0}, during {:.0}, after {:.0}; RTO {}",
            m.before.delivered_per_s,
            m.during.delivered_per_s,
            m.after.delivered_per_s,
            m.rto_s.map_or(format!("none ({})", m.rto_note), |s| format!("{s:.1} s"))
        );
        let _ = writeln!(o, "\n| fault | node | chaosd experiment | counters | note |\n|---|---|---|---|---|");
        for f in &c.run.faults {
            let counters = counters_text(&f.counters);
            let note = f.not_run.clone().or(f.no_evidence.clone()).unwrap_or_default();
            let _ = writeln!(
                o,
                "| {} | {} | {} {} | {} | {} |",
                f.kind,
                f.node,
                f.experiment_id.clone().unwrap_or("-".into()),
                f.summary,
                counters,
                note
            );
        }
        let cluster = cluster_line(c);
        if !cluster.is_empty() {
            let _ = writeln!(o, "\ncluster (each node's /cluster, every second): {cluster}");
        }
        if !c.run.events.is_empty() {
            let _ = writeln!(o, "\nevents:");
            for e in &c.run.events {
                let _ = writeln!(o, "- t={:.1}s {}", e.t, e.what);
            }
        }
    }
    o
}

/// chaosd's non-zero counters of a fault.
fn counters_text(c: &serde_json::Value) -> String {
    c.as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// What one node's /cluster showed over a case.
#[derive(Default)]
struct NodeView {
    min_up: Option<u64>,
    peers: u64,
    max_queue: u64,
    dropped_first: Option<u64>,
    dropped_last: u64,
}

/// Per node over the case: fewest peers seen up, longest forward queue,
/// forwards dropped during the case.
pub fn cluster_line(c: &CaseResult) -> String {
    let mut by: std::collections::BTreeMap<&str, NodeView> = Default::default();
    for s in &c.run.scrapes {
        let e = by.entry(&s.node).or_default();
        let Some(up) = s.peers_up else { continue };
        e.min_up = Some(e.min_up.map_or(up, |m| m.min(up)));
        e.peers = e.peers.max(s.peers.unwrap_or(0));
        e.max_queue = e.max_queue.max(s.forward_queue.unwrap_or(0));
        let d = s.forwards_dropped.unwrap_or(0);
        e.dropped_first.get_or_insert(d);
        e.dropped_last = e.dropped_last.max(d);
    }
    by.iter()
        .map(|(n, v)| match v.min_up {
            None => format!("{n}: unreachable"),
            Some(up) => format!(
                "{n}: peers up min {up}/{}, forward queue max {}, forwards dropped +{}",
                v.peers,
                v.max_queue,
                v.dropped_last - v.dropped_first.unwrap_or(v.dropped_last).min(v.dropped_last)
            ),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// One chart: delivered msgs/s per QoS (left axis) and p50/p99 latency
/// (right axis, ms) over the case's seconds; the fault window shaded, the
/// recovery point marked. One point per second.
pub fn svg(c: &CaseResult) -> String {
    let (w, h, l, r, t, b) = (900.0, 300.0, 60.0, 60.0, 20.0, 40.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let Some(first) = c.windows.first().map(|x| x.t) else {
        return format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"60\"><text x=\"10\" y=\"30\">no data recorded</text></svg>"
        );
    };
    let n = c.windows.len().max(2) as f64;
    let x = |tt: f64| l + (tt - first as f64) / (n - 1.0).max(1.0) * pw;
    let max_rate = c.windows.iter().flat_map(|w| w.received).max().unwrap_or(1).max(1) as f64;
    let max_lat = c.windows.iter().filter_map(|w| w.latency_ms.as_ref().map(|l| l.p99)).fold(1.0f64, f64::max);
    let y_rate = |v: f64| t + ph - v / max_rate * ph;
    let y_lat = |v: f64| t + ph - v / max_lat * ph;
    let mut o = String::new();
    let _ = write!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"chart\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    let (f0, f1) = c.run.fault;
    let _ = write!(
        o,
        "<rect class=\"fault-window\" x=\"{:.1}\" y=\"{t}\" width=\"{:.1}\" height=\"{ph}\" fill=\"#f4a261\" fill-opacity=\"0.25\"><title>fault {:.1}s..{:.1}s</title></rect>",
        x(f0),
        (x(f1) - x(f0)).max(1.0),
        f0,
        f1
    );
    let _ = write!(o, "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#333\"/>", t + ph, l + pw, t + ph);
    let _ = write!(o, "<line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" stroke=\"#333\"/>", t + ph);
    let _ = write!(o, "<line x1=\"{}\" y1=\"{t}\" x2=\"{}\" y2=\"{}\" stroke=\"#333\"/>", l + pw, l + pw, t + ph);
    let _ = write!(o, "<text x=\"4\" y=\"{}\">{max_rate:.0}/s</text><text x=\"4\" y=\"{}\">0</text>", t + 10.0, t + ph);
    let _ = write!(o, "<text x=\"{}\" y=\"{}\">{max_lat:.0} ms</text>", l + pw + 4.0, t + 10.0);
    let _ = write!(
        o,
        "<text x=\"{l}\" y=\"{}\">t={first}s</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">t={}s</text>",
        h - 22.0,
        l + pw,
        h - 22.0,
        first + c.windows.len() as u64 - 1
    );
    let colors = ["#8d99ae", "#2a9d8f", "#264653"];
    for (q, col) in colors.iter().enumerate() {
        let pts: Vec<String> =
            c.windows.iter().map(|w| format!("{:.1},{:.1}", x(w.t as f64), y_rate(w.received[q] as f64))).collect();
        let _ = write!(
            o,
            "<polyline class=\"rate-qos{q}\" fill=\"none\" stroke=\"{col}\" stroke-width=\"1.5\" points=\"{}\"/>",
            pts.join(" ")
        );
        for w in &c.windows {
            let _ = write!(
                o,
                "<circle class=\"point-qos{q}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"1.5\" fill=\"{col}\"><title>t={}s QoS {q}: {} msgs/s</title></circle>",
                x(w.t as f64),
                y_rate(w.received[q] as f64),
                w.t,
                w.received[q]
            );
        }
    }
    for (name, pick, col, dash) in [
        (
            "p50",
            (|l: &mqtt_workload::stats::Latency| l.p50) as fn(&mqtt_workload::stats::Latency) -> f64,
            "#e76f51",
            "4 2",
        ),
        ("p99", |l: &mqtt_workload::stats::Latency| l.p99, "#d62828", ""),
    ] {
        let pts: Vec<String> = c
            .windows
            .iter()
            .filter_map(|w| w.latency_ms.as_ref().map(|lat| format!("{:.1},{:.1}", x(w.t as f64), y_lat(pick(lat)))))
            .collect();
        let _ = write!(
            o,
            "<polyline class=\"latency-{name}\" fill=\"none\" stroke=\"{col}\" stroke-dasharray=\"{dash}\" stroke-width=\"1.2\" points=\"{}\"/>",
            pts.join(" ")
        );
    }
    if let Some(rto) = c.metrics.rto_s {
        let kill = c.run.faults.iter().filter(|f| f.kind == "kill").filter_map(|f| f.injected_at).reduce(f64::min);
        let at = kill.unwrap_or(f1) + rto;
        let _ = write!(
            o,
            "<g class=\"recovery-point\"><line x1=\"{0:.1}\" y1=\"{t}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"#2b9348\" stroke-width=\"2\"/><circle cx=\"{0:.1}\" cy=\"{2}\" r=\"5\" fill=\"#2b9348\"><title>recovered after {rto:.1}s</title></circle></g>",
            x(at),
            t + ph,
            t + 6.0
        );
    }
    let legend = [
        ("QoS 0 msgs/s", colors[0]),
        ("QoS 1 msgs/s", colors[1]),
        ("QoS 2 msgs/s", colors[2]),
        ("p50 ms", "#e76f51"),
        ("p99 ms", "#d62828"),
        ("fault", "#f4a261"),
        ("recovered", "#2b9348"),
    ];
    for (i, (name, col)) in legend.iter().enumerate() {
        let lx = l + i as f64 * 115.0;
        let _ = write!(
            o,
            "<rect x=\"{lx}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{col}\"/><text x=\"{}\" y=\"{}\">{name}</text>",
            h - 12.0,
            lx + 14.0,
            h - 3.0
        );
    }
    o.push_str("</svg>");
    o
}

pub fn html(r: &Report) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>chaosctl run: {}</title><style>\
         body{{font-family:sans-serif;margin:2em;max-width:1000px}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}.pass{{color:#2b9348}}.fail{{color:#d62828}}\
         .unknown,.not_run{{color:#b08900}}</style></head><body>",
        esc(&r.plan)
    );
    let _ = write!(
        o,
        "<h1>{} — <span class=\"{}\">{}</span></h1><p>plan {}, run directory {}, exit code {}</p>",
        esc(&r.plan),
        r.verdict,
        r.verdict,
        esc(&r.plan_file),
        esc(&r.run_dir),
        r.exit_code
    );
    if !r.steady_state.reached {
        let _ = write!(
            o,
            "<p class=\"unknown\">The workload never reached a steady state: {}</p>",
            esc(&r.steady_state.detail)
        );
    }
    o.push_str("<table><tr><th>case</th><th>fault</th><th>verdict</th><th>why</th><th>lost q0/q1/q2</th><th>dups q2</th><th>p99 ms before/during/after</th><th>throughput</th><th>RTO</th></tr>");
    for c in &r.cases {
        let m = &c.metrics;
        let cls = match c.verdict {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Unknown => "unknown",
            Verdict::NotRun => "not_run",
        };
        let _ = write!(
            o,
            "<tr><td><a href=\"#{}\">{}</a></td><td>{}</td><td class=\"{cls}\">{}</td><td>{}</td><td>{}/{}/{}</td><td>{}</td><td>{} / {} / {}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.name),
            esc(&c.name),
            esc(&c.fault),
            c.verdict.as_str(),
            esc(&c.reasons.join("; ")),
            m.lost[0],
            m.lost[1],
            m.lost[2],
            m.duplicates[2],
            ms(p99(&m.before.latency_ms)),
            ms(p99(&m.during.latency_ms)),
            ms(p99(&m.after.latency_ms)),
            m.throughput_ratio.map_or("-".into(), |t| format!("{:.0}%", t * 100.0)),
            m.rto_s.map_or("-".into(), |s| format!("{s:.0} s"))
        );
    }
    o.push_str("</table>");
    for e in &r.errors {
        let _ = write!(o, "<p class=\"fail\">error: {}</p>", esc(e));
    }
    for c in &r.cases {
        let _ = write!(o, "<h2 id=\"{}\">{} — {}</h2>", esc(&c.name), esc(&c.name), c.verdict.as_str());
        o.push_str("<ul>");
        for why in &c.reasons {
            let _ = write!(o, "<li>{}</li>", esc(why));
        }
        o.push_str("</ul>");
        o.push_str(&svg(c));
        o.push_str(
            "<table><tr><th>fault</th><th>node</th><th>chaosd experiment</th><th>counters</th><th>note</th></tr>",
        );
        for f in &c.run.faults {
            let _ = write!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&f.kind),
                esc(&f.node),
                esc(&f.summary),
                esc(&counters_text(&f.counters)),
                esc(f.not_run.as_deref().or(f.no_evidence.as_deref()).unwrap_or(""))
            );
        }
        o.push_str("</table>");
        let cluster = cluster_line(c);
        if !cluster.is_empty() {
            let _ = write!(o, "<p>cluster: {}</p>", esc(&cluster));
        }
        o.push_str("<ul>");
        for e in &c.run.events {
            let _ = write!(o, "<li>t={:.1}s {}</li>", e.t, esc(&e.what));
        }
        o.push_str("</ul>");
    }
    o.push_str("</body></html>\n");
    o
}

pub fn write(dir: &Path, r: &Report) -> Result<(), String> {
    let put = |name: &str, body: &str| {
        std::fs::write(dir.join(name), body).map_err(|e| format!("cannot write {}: {e}", dir.join(name).display()))
    };
    let json = serde_json::to_string_pretty(r).map_err(|e| format!("report.json: {e}"))?;
    put("report.json", &json)?;
    put("report.schema.json", SCHEMA)?;
    put("report.md", &markdown(r))?;
    put("report.html", &html(r))
}
