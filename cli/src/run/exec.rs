//! Running the cases: steady state, then per case baseline -> inject ->
//! hold -> recover -> recovery window, with chaosd's counters, the nodes'
//! /cluster state and events recorded every second.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use chaos_proto::chaosd::v1::chaosd_client::ChaosdClient;
use mqtt_workload::Workload;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::inject;
use super::plan::{Case, Mode};
use super::sut::{Node, Sut};

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Seconds since the workload started.
    pub t: f64,
    pub what: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultRun {
    pub kind: String,
    pub node: String,
    pub line: usize,
    pub experiment_id: Option<String>,
    pub summary: String,
    pub injected_at: Option<f64>,
    pub recovered_at: Option<f64>,
    /// chaosd's counters, the largest seen (stressor memory drops at the end).
    pub counters: serde_json::Value,
    /// Why this fault gives no evidence (not injected, no effect...).
    pub no_evidence: Option<String>,
    /// Set when chaosd could not do it at all (kernel, not implemented).
    pub not_run: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Scrape {
    pub t: f64,
    pub node: String,
    pub peers_up: Option<u64>,
    pub peers: Option<u64>,
    pub forwards_dropped: Option<u64>,
    pub forward_queue: Option<u64>,
}

/// What happened in one case, before judging.
#[derive(Debug, Clone, Serialize)]
pub struct CaseRun {
    pub name: String,
    pub baseline: (f64, f64),
    pub fault: (f64, f64),
    pub recovery: (f64, f64),
    pub faults: Vec<FaultRun>,
    pub events: Vec<Event>,
    pub scrapes: Vec<Scrape>,
    /// Nodes that were not alive at the end of the recovery window.
    pub nodes_down_at_end: Vec<String>,
    /// Set when the case could not be run to the end.
    pub aborted: Option<String>,
}

/// The daemons of a run: a node's own when the plan names one, else the
/// runner's.
#[derive(Default)]
pub struct Daemons {
    pub default: Option<ChaosdClient<Channel>>,
    pub by_node: BTreeMap<String, ChaosdClient<Channel>>,
}

impl Daemons {
    /// The client for `node`'s chaosd (`Daemons` is built so that every
    /// node has one: the default exists unless every node has its own).
    pub fn of(&mut self, node: &str) -> &mut ChaosdClient<Channel> {
        match self.by_node.get_mut(node) {
            Some(c) => c,
            None => self.default.as_mut().expect("a node without its own chaosd uses the runner's"),
        }
    }
}

pub struct Ctx<'a> {
    pub chaosd: Daemons,
    pub sut: &'a Sut,
    pub unavailable: BTreeMap<String, String>,
    pub stop: CancellationToken,
    pub start_ns: u64,
    /// Every experiment this run injected and has not seen end (node, id).
    pub live: Vec<(String, String)>,
    /// Each node's broker pid as last seen (None: down).
    pub pids: BTreeMap<String, Option<u32>>,
}

impl Ctx<'_> {
    pub fn now(&self) -> f64 {
        (mqtt_workload::record::now_ns().saturating_sub(self.start_ns)) as f64 / 1e9
    }

    /// Sleeps `d` while sampling every second; false when interrupted.
    async fn hold(&mut self, d: Duration, run: &mut CaseRun, w: &Workload, phase: &str) -> bool {
        let end = Instant::now() + d;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep(left.min(Duration::from_secs(1))) => {}
                _ = self.stop.cancelled() => return false,
            }
            self.sample(run).await;
            progress(run, w, phase, end.saturating_duration_since(Instant::now()), self.now());
        }
    }

    async fn sample(&mut self, run: &mut CaseRun) {
        let t = self.now();
        for f in run.faults.iter_mut() {
            if let (Some(id), None) = (&f.experiment_id, f.recovered_at)
                && let Ok(e) = inject::get(self.chaosd.of(&f.node), id).await
            {
                merge_max(&mut f.counters, &inject::counters_json(&e));
            }
        }
        for n in &self.sut.nodes {
            let now = n.current_pid();
            let alive = n.alive();
            let before = self.pids.get(&n.name).copied().flatten();
            if alive && now != before {
                run.events.push(Event { t, what: format!("node {} restarted (pid {})", n.name, now.unwrap_or(0)) });
            } else if !alive && before.is_some() {
                run.events.push(Event { t, what: format!("node {} died", n.name) });
                self.pids.insert(n.name.clone(), None);
                continue;
            }
            if alive {
                self.pids.insert(n.name.clone(), now);
            }
            if let Some(h) = n.http {
                run.scrapes.push(scrape(t, n, h).await);
            }
        }
    }
}

fn merge_max(into: &mut serde_json::Value, from: &serde_json::Value) {
    let (Some(a), Some(b)) = (into.as_object_mut(), from.as_object()) else {
        *into = from.clone();
        return;
    };
    for (k, v) in b {
        let new = v.as_u64().unwrap_or(0);
        let old = a.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        a.insert(k.clone(), serde_json::json!(new.max(old)));
    }
}

async fn scrape(t: f64, n: &Node, h: std::net::SocketAddr) -> Scrape {
    let mut s =
        Scrape { t, node: n.name.clone(), peers_up: None, peers: None, forwards_dropped: None, forward_queue: None };
    let Ok(Ok(body)) = tokio::time::timeout(Duration::from_millis(500), http_get(h, "/cluster")).await else {
        return s;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else { return s };
    if let Some(m) = v["members"].as_array() {
        s.peers = Some(m.len() as u64);
        s.peers_up = Some(m.iter().filter(|x| x["state"] == "up").count() as u64);
        s.forwards_dropped = Some(m.iter().filter_map(|x| x["forwards_dropped"].as_u64()).sum());
        s.forward_queue = Some(m.iter().filter_map(|x| x["forward_queue"].as_u64()).sum());
    }
    s
}

/// A plain HTTP/1.0 GET: the body of a 200 answer.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::other(head.lines().next().unwrap_or("").to_string()));
    }
    Ok(body.to_string())
}

fn progress(run: &CaseRun, w: &Workload, phase: &str, left: Duration, now: f64) {
    let mut err = std::io::stderr();
    if !err.is_terminal() {
        return;
    }
    let t = now.floor() as u64;
    let win = w.window(t.saturating_sub(1));
    let rx: u64 = win.received.iter().sum();
    let tx: u64 = win.sent.iter().sum();
    let p99 = win.latency_ms.map_or("-".into(), |l| format!("{:.1}ms", l.p99));
    let _ = write!(
        err,
        "\r\x1b[2K  {:<24} {:<9} {:>4}s left  sent {tx:>5}/s  delivered {rx:>5}/s  p99 {p99}",
        run.name,
        phase,
        left.as_secs()
    );
    let _ = err.flush();
}

fn say(line: String) {
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(err, "\r\x1b[2K");
    }
    let _ = writeln!(err, "chaosctl run: {line}");
}

/// Runs one case. Returns with every fault it injected recovered.
pub async fn run_case(ctx: &mut Ctx<'_>, case: &Case, w: &Workload, index: usize, total: usize) -> CaseRun {
    let t0 = ctx.now();
    let mut run = CaseRun {
        name: case.name.clone(),
        baseline: (t0, t0),
        fault: (t0, t0),
        recovery: (t0, t0),
        faults: Vec::new(),
        events: Vec::new(),
        scrapes: Vec::new(),
        nodes_down_at_end: Vec::new(),
        aborted: None,
    };
    ctx.pids = ctx.sut.nodes.iter().map(|n| (n.name.clone(), n.current_pid().filter(|_| n.alive()))).collect();
    say(format!("case {}/{total} '{}': baseline {:?}", index + 1, case.name, case.baseline));
    let ok = ctx.hold(case.baseline, &mut run, w, "baseline").await;
    run.baseline.1 = ctx.now();
    if !ok {
        run.aborted = Some("interrupted (SIGINT/SIGTERM) during the baseline".into());
        return run;
    }
    // Which faults, on which nodes, for how long.
    let mut plan: Vec<(usize, &Node, Duration)> = Vec::new();
    for (i, f) in case.faults.iter().enumerate() {
        let hold = match case.mode {
            Mode::Sequence => case.fault_time / case.faults.len() as u32,
            Mode::Parallel => f.duration.unwrap_or(case.fault_time),
        };
        for n in inject::targets(f, &ctx.sut.nodes) {
            plan.push((i, n, hold));
            run.faults.push(FaultRun {
                kind: f.action.name().into(),
                node: n.name.clone(),
                line: f.line,
                experiment_id: None,
                summary: String::new(),
                injected_at: None,
                recovered_at: None,
                counters: serde_json::json!({}),
                no_evidence: None,
                not_run: None,
            });
        }
    }
    run.fault.0 = ctx.now();
    say(format!("case '{}': fault for {:?}", case.name, case.fault_time));
    let groups: Vec<Vec<usize>> = match case.mode {
        Mode::Parallel => vec![(0..plan.len()).collect()],
        Mode::Sequence => {
            (0..case.faults.len()).map(|fi| (0..plan.len()).filter(|k| plan[*k].0 == fi).collect()).collect()
        }
    };
    let mut interrupted = false;
    for g in groups {
        let start = Instant::now();
        for &k in &g {
            let (fi, node, hold) = plan[k];
            let f = &case.faults[fi];
            let fr = &mut run.faults[k];
            if let super::plan::Action::NotYet { params, .. } = &f.action {
                let params: Vec<String> = params.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                let with = if params.is_empty() { String::new() } else { format!(" ({})", params.join(", ")) };
                fr.not_run = Some(format!("not run: chaosd has no such fault yet{with}"));
                continue;
            }
            if let Some(why) = ctx.unavailable.get(f.action.name()) {
                fr.not_run = Some(format!("not injected: {why}"));
                continue;
            }
            let req = match inject::request(f, node, &ctx.sut.nodes, hold) {
                Ok(r) => r,
                Err(e) => {
                    fr.no_evidence = Some(e);
                    continue;
                }
            };
            match inject::inject(ctx.chaosd.of(&node.name), req).await {
                Ok(e) => {
                    let t = ctx.now();
                    fr.injected_at = Some(t);
                    fr.summary = e.summary.clone();
                    fr.experiment_id = Some(e.id.clone());
                    ctx.live.push((node.name.clone(), e.id.clone()));
                    run.events.push(Event { t, what: format!("injected {} ({})", e.summary, e.id) });
                }
                Err(e) => fr.no_evidence = Some(format!("chaosd refused the {} fault: {e}", f.action.name())),
            }
        }
        // Each fault of the group ends after its own hold; the group ends
        // with the longest.
        let mut order: Vec<usize> = g.clone();
        order.sort_by_key(|k| plan[*k].2);
        for k in order {
            let left = plan[k].2.saturating_sub(start.elapsed());
            if !interrupted && !ctx.hold(left, &mut run, w, "fault").await {
                interrupted = true;
            }
            end_fault(ctx, &mut run, k).await;
        }
        if interrupted {
            break;
        }
    }
    run.fault.1 = ctx.now();
    if interrupted {
        run.aborted = Some("interrupted (SIGINT/SIGTERM) during the fault".into());
        return run;
    }
    say(format!("case '{}': recovery window {:?}", case.name, case.recovery));
    run.recovery.0 = run.fault.1;
    let ok = ctx.hold(case.recovery, &mut run, w, "recovery").await;
    run.recovery.1 = ctx.now();
    // Only nodes whose process is known can be seen to be down.
    run.nodes_down_at_end = ctx
        .sut
        .nodes
        .iter()
        .filter(|n| (n.pid.is_some() || n.pid_file.is_some()) && !n.alive())
        .map(|n| n.name.clone())
        .collect();
    if !ok {
        run.aborted = Some("interrupted (SIGINT/SIGTERM) during the recovery window".into());
    }
    run
}

async fn end_fault(ctx: &mut Ctx<'_>, run: &mut CaseRun, k: usize) {
    let Some(id) = run.faults[k].experiment_id.clone() else { return };
    if run.faults[k].recovered_at.is_some() {
        return;
    }
    let node = run.faults[k].node.clone();
    let r = inject::recover(ctx.chaosd.of(&node), &id).await;
    let t = ctx.now();
    let fr = &mut run.faults[k];
    fr.recovered_at = Some(t);
    ctx.live.retain(|(n, x)| !(x == &id && n == &node));
    match r {
        Ok(e) => {
            merge_max(&mut fr.counters, &inject::counters_json(&e));
            let mut e = e;
            // The evidence check reads the largest counters seen.
            if let Some(c) = e.counters.as_mut() {
                let g = |k: &str| fr.counters[k].as_u64().unwrap_or(0);
                c.packets_matched = g("packets_matched");
                c.stress_cpu_time_ns = g("stress_cpu_time_ns");
                c.stress_resident_bytes = g("stress_resident_bytes");
                c.processes_signalled = g("processes_signalled") as u32;
            }
            if let Err(why) = inject::evidence(&action_of(&fr.kind), &e) {
                fr.no_evidence = Some(why);
            }
            run.events.push(Event {
                t,
                what: format!("recovered {} ({})", fr.summary, crate::experiment::state_name(e.state())),
            });
        }
        Err(e) => {
            fr.no_evidence = Some(format!("chaosd did not answer the recovery of {id}: {e}"));
            run.events.push(Event { t, what: format!("recovery of {id} failed: {e}") });
        }
    }
}

/// Enough of an action to check evidence by its kind.
fn action_of(kind: &str) -> super::plan::Action {
    use super::plan::Action as A;
    match kind {
        "stress-cpu" => A::Cpu { workers: 1, load: 1 },
        "stress-memory" => A::Memory { size: String::new(), workers: 1 },
        "kill" => A::Kill { signal: None },
        "pause" => A::Pause,
        _ => A::Partition,
    }
}

/// Ends whatever this run injected and has not ended yet.
pub async fn recover_all(ctx: &mut Ctx<'_>) -> Vec<String> {
    let mut errors = Vec::new();
    for (node, id) in std::mem::take(&mut ctx.live) {
        if let Err(e) = inject::recover(ctx.chaosd.of(&node), &id).await {
            errors.push(format!("{id} (node {node}): {e}"));
        }
    }
    errors
}
