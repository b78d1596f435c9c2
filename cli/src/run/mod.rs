//! `chaosctl run PLAN.toml`: runs a chaos plan against a broker cluster
//! with a real MQTT workload and writes a verdict report. See
//! cli/plans/example.toml for every key of a plan.
//!
//! Exit code: 0 every case passed; 1 a case failed; 2 a case is unknown or
//! not run, the plan is invalid, or the run could not start.

mod check;
mod exec;
mod inject;
mod plan;
mod report;
mod sut;
mod verdict;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mqtt_workload::{Group, Spec, Workload};
use tokio_util::sync::CancellationToken;

use exec::{CaseRun, Ctx};

use crate::client::Daemon;
use report::{Report, SteadyState};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The plan (TOML); see cli/plans/example.toml.
    pub plan: PathBuf,
    /// Where the report goes (default: a new /tmp/chaosctl-run-* directory).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Only read and check the plan.
    #[arg(long)]
    pub check: bool,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn err(msg: impl std::fmt::Display) -> u8 {
    eprintln!("chaosctl run: {msg}");
    2
}

/// Reads and checks a plan: every error before anything starts.
pub fn load(path: &Path) -> Result<plan::Plan, String> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the plan {name}: {e}"))?;
    let mut p = plan::parse(&name, &text)?;
    plan::read_faults(&name, &text, &mut p)?;
    check::check(&p).map_err(|e| format!("{name}: {e}"))?;
    // A node's certificate files are named relative to the plan.
    if let plan::Sut::Attach { nodes, .. } = &mut p.sut {
        let base = path.parent().unwrap_or(Path::new("."));
        for c in nodes.iter_mut().filter_map(|n| n.chaosd.as_mut()) {
            for f in [&mut c.ca, &mut c.cert, &mut c.key] {
                *f = base.join(&*f).display().to_string();
            }
        }
    }
    Ok(p)
}

/// Entry point; runs before any async runtime exists, so that the process
/// can enter the cluster's hub namespace first.
pub fn main(daemon: &Daemon, args: RunArgs) -> u8 {
    let plan = match load(&args.plan) {
        Ok(p) => p,
        Err(e) => return err(e),
    };
    if args.check {
        println!("{}: {} case(s), plan is valid", args.plan.display(), plan.cases.len());
        return 0;
    }
    let dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/chaosctl-run-{}-{}", unix_ms() / 1000, std::process::id())));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return err(format!("cannot create the run directory {}: {e}", dir.display()));
    }
    let dir = dir.canonicalize().unwrap_or(dir);
    println!("run directory: {}", dir.display());
    // chaosd first: without it nothing can be judged, so nothing starts.
    let daemons = match daemons(daemon, &plan) {
        Ok(d) => d,
        Err(e) => return err(e),
    };
    let unavailable = match probe(&daemons) {
        Ok(u) => u,
        Err(e) => return err(e),
    };
    let started = unix_ms();
    eprintln!("chaosctl run: starting the system under test");
    let sut = match sut::start(&plan, &dir) {
        Ok(s) => s,
        Err(e) => return err(e),
    };
    let mut errors = Vec::new();
    let entered = match &sut.client_netns {
        Some(ns) => sut::enter_netns(ns).map(Some),
        None => Ok(None),
    };
    let outcome = match &entered {
        Err(e) => Err(e.clone()),
        Ok(_) => match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => {
                let r = rt.block_on(execute(&daemons, &plan, &sut, unavailable));
                rt.shutdown_timeout(Duration::from_secs(2));
                r
            }
            Err(e) => Err(format!("cannot start the async runtime: {e}")),
        },
    };
    if let Ok(Some(home)) = &entered
        && let Err(e) = sut::return_to(home)
    {
        errors.push(e);
    }
    if let Some(local) = &sut.local {
        eprintln!("chaosctl run: removing the local cluster");
        if let Err(e) = sut::stop_local(local) {
            errors.push(e);
        }
    }
    let (cases, steady, totals, mut more) = match outcome {
        Ok(x) => x,
        Err(e) => return err(e),
    };
    errors.append(&mut more);
    let mut code = verdict::exit_code(&cases);
    if !errors.is_empty() {
        code = code.max(2);
    }
    let r = Report {
        schema_version: report::SCHEMA_VERSION,
        plan: if plan.name.is_empty() { args.plan.display().to_string() } else { plan.name.clone() },
        plan_file: args.plan.display().to_string(),
        started_unix_ms: started,
        finished_unix_ms: unix_ms(),
        run_dir: dir.display().to_string(),
        verdict: report::overall(code),
        exit_code: code,
        nodes: sut.nodes.clone(),
        workload: spec(&plan, &sut).unwrap_or_else(|_| Spec::single("0.0.0.0:1".parse().expect("addr"), 0, 0)),
        steady_state: steady,
        totals,
        errors,
        cases,
    };
    if let Err(e) = report::write(&dir, &r) {
        return err(e);
    }
    println!("{}", report::table(&r));
    println!("verdict: {} (exit code {code})", r.verdict);
    println!("report: {}", dir.join("report.html").display());
    println!("        {}", dir.join("report.md").display());
    println!("        {}", dir.join("report.json").display());
    code
}

/// The daemons the run uses: each attached node's own (when the plan names
/// one) and, for the other nodes, the runner's (`--socket`/`--endpoint`),
/// labelled for messages.
fn daemons(default: &Daemon, plan: &plan::Plan) -> Result<Vec<(Option<String>, Daemon)>, String> {
    let own = sut::node_daemons(plan)?;
    let mut all: Vec<(Option<String>, Daemon)> = Vec::new();
    let every_node_has_one = match &plan.sut {
        plan::Sut::Attach { nodes, .. } => nodes.iter().all(|n| n.chaosd.is_some()),
        plan::Sut::Local { .. } => false,
    };
    if !every_node_has_one {
        all.push((None, default.clone()));
    }
    all.extend(own.into_iter().map(|(n, d)| (Some(n), d)));
    Ok(all)
}

fn label(node: &Option<String>, d: &Daemon) -> String {
    match node {
        Some(n) => format!("node {n}'s chaosd ({d})"),
        None => format!("chaosd at {d}"),
    }
}

/// chaosd's fault availability (fault name -> why not; a fault one daemon
/// lacks is unavailable for the run), or why a daemon cannot be used.
fn probe(daemons: &[(Option<String>, Daemon)]) -> Result<BTreeMap<String, String>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(async {
        let mut unavailable = BTreeMap::new();
        for (node, d) in daemons {
            let who = label(node, d);
            let mut c = crate::client::connect(d).await.map_err(|e| format!("{who}: {}", e.message))?;
            let s = tokio::time::timeout(Duration::from_secs(10), c.status(chaos_proto::chaosd::v1::StatusRequest {}))
                .await
                .map_err(|_| format!("{who} did not answer its status within 10 s"))?
                .map_err(|e| format!("{who}: {}", crate::client::request_error(d, e).message))?
                .into_inner();
            for f in s.faults.into_iter().filter(|f| !f.available) {
                let why = if node.is_some() { format!("{who}: {}", f.reason) } else { f.reason };
                unavailable.entry(f.fault).or_insert(why);
            }
        }
        Ok(unavailable)
    })
}

fn spec(plan: &plan::Plan, sut: &sut::Sut) -> Result<Spec, String> {
    let w = &plan.workload;
    let groups = |list: &[plan::Clients]| -> Result<Vec<Group>, String> {
        list.iter()
            .map(|c| {
                let addr = match (&c.node, c.addr) {
                    (_, Some(a)) => a,
                    (Some(n), None) => {
                        sut.nodes.iter().find(|x| &x.name == n).ok_or(format!("node {n} is not in the SUT"))?.mqtt
                    }
                    (None, None) => return Err("a client group without node or addr".to_string()),
                };
                Ok(Group { addr, count: c.count })
            })
            .collect()
    };
    Ok(Spec {
        protocol: w.protocol,
        publishers: groups(&w.publishers)?,
        subscribers: groups(&w.subscribers)?,
        rate: w.rate,
        qos_mix: w.qos_mix,
        topics: w.topics,
        fanout: w.fanout,
        payload: w.payload,
        session: w.session,
        reconnect: mqtt_workload::Reconnect { initial: w.reconnect.initial, max: w.reconnect.max },
        inflight: w.inflight,
        prefix: format!("chaosrun/{}", std::process::id()),
        id_prefix: format!("chaosrun{}", std::process::id()),
    })
}

type Outcome = (Vec<verdict::CaseResult>, SteadyState, Option<[mqtt_workload::stats::QosReport; 3]>, Vec<String>);

async fn execute(
    daemons: &[(Option<String>, Daemon)],
    plan: &plan::Plan,
    sut: &sut::Sut,
    unavailable: BTreeMap<String, String>,
) -> Result<Outcome, String> {
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("\nchaosctl run: interrupted: recovering every injected fault and tearing down");
        on_signal.cancel();
    });
    let mut chaosd = exec::Daemons::default();
    for (node, d) in daemons {
        let c = crate::client::connect(d).await.map_err(|e| format!("{}: {}", label(node, d), e.message))?;
        match node {
            Some(n) => chaosd.by_node.insert(n.clone(), c),
            None => chaosd.default.replace(c),
        };
    }
    let spec = spec(plan, sut)?;
    let expected_subs = spec.subscriber_count() as i64;
    let mut w = match Workload::start(spec, plan.workload.steady_state).await {
        Ok(w) => w,
        Err(e) => {
            // Nothing was injected; every case is unknown, and says why.
            let detail = format!("the workload could not start: {e}");
            let empty = mqtt_workload::Summary {
                start_unix_ms: 0,
                windows: Vec::new(),
                qos: Default::default(),
                total: Default::default(),
                window_s: 0.0,
                publisher_reconnects: 0,
                subscriber_reconnects: 0,
                subscribed: 0,
                latency_us: Default::default(),
                latency_by_send_second: Vec::new(),
            };
            let results = plan
                .cases
                .iter()
                .map(|c| {
                    let run = CaseRun {
                        name: c.name.clone(),
                        baseline: (0.0, 0.0),
                        fault: (0.0, 0.0),
                        recovery: (0.0, 0.0),
                        faults: Vec::new(),
                        events: Vec::new(),
                        scrapes: Vec::new(),
                        nodes_down_at_end: Vec::new(),
                        aborted: Some(format!("nothing injected: {detail}")),
                    };
                    verdict::judge(run, plan.thresholds.merged(&c.thresholds), &empty)
                })
                .collect();
            return Ok((results, SteadyState { reached: false, detail }, None, Vec::new()));
        }
    };
    drop(w.windows());
    let (steady, detail) = steady_state(&w, plan.workload.steady_state, expected_subs, &stop).await;
    eprintln!("chaosctl run: steady state: {detail}");
    let mut ctx = Ctx {
        chaosd,
        sut,
        unavailable,
        stop: stop.clone(),
        start_ns: w.start_unix_ns(),
        live: Vec::new(),
        pids: BTreeMap::new(),
    };
    let mut runs: Vec<CaseRun> = Vec::new();
    for (i, case) in plan.cases.iter().enumerate() {
        let not_started = |why: String| CaseRun {
            name: case.name.clone(),
            baseline: (0.0, 0.0),
            fault: (0.0, 0.0),
            recovery: (0.0, 0.0),
            faults: Vec::new(),
            events: Vec::new(),
            scrapes: Vec::new(),
            nodes_down_at_end: Vec::new(),
            aborted: Some(why),
        };
        if !steady {
            runs.push(not_started(format!("nothing injected: the workload never reached a steady state: {detail}")));
            continue;
        }
        if stop.is_cancelled() {
            runs.push(not_started("not started: the run was interrupted".into()));
            continue;
        }
        // Hard deadline: the case's own time plus room for slow chaosd calls.
        let limit = case.baseline + case.fault_time + case.recovery + Duration::from_secs(60);
        let case_stop = stop.child_token();
        let fire = case_stop.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            fire.cancel();
        });
        ctx.stop = case_stop.clone();
        let mut run = exec::run_case(&mut ctx, case, &w, i, plan.cases.len()).await;
        timer.abort();
        if case_stop.is_cancelled() && !stop.is_cancelled() {
            run.aborted = Some(format!("the case exceeded its hard deadline of {} s", limit.as_secs()));
        }
        let left = exec::recover_all(&mut ctx).await;
        for e in left {
            run.events.push(exec::Event { t: ctx.now(), what: format!("recovery failed: {e}") });
        }
        runs.push(run);
    }
    let drain = if stop.is_cancelled() { Duration::from_secs(2) } else { plan.workload.drain };
    eprintln!("chaosctl run: draining the workload ({} s)", drain.as_secs());
    let summary = w.stop(drain).await;
    let mut errors = Vec::new();
    // Nothing of this run may stay active.
    for e in exec::recover_all(&mut ctx).await {
        errors.push(format!("could not recover {e}"));
    }
    let results = runs
        .into_iter()
        .zip(&plan.cases)
        .map(|(run, case)| verdict::judge(run, plan.thresholds.merged(&case.thresholds), &summary))
        .collect();
    if stop.is_cancelled() {
        errors.push("the run was interrupted (SIGINT/SIGTERM)".into());
    }
    Ok((results, SteadyState { reached: steady, detail }, Some(summary.qos.clone()), errors))
}

/// Two consecutive seconds with messages sent and delivered and every
/// subscriber connected.
async fn steady_state(w: &Workload, within: Duration, subs: i64, stop: &CancellationToken) -> (bool, String) {
    let end = tokio::time::Instant::now() + within;
    loop {
        let t = w.elapsed().as_secs();
        if t >= 3 {
            let a = w.window(t - 1);
            let b = w.window(t - 2);
            let ok = |x: &mqtt_workload::Window| {
                x.sent.iter().sum::<u64>() > 0 && x.received.iter().sum::<u64>() > 0 && x.subscribers_connected >= subs
            };
            if ok(&a) && ok(&b) {
                return (true, format!("{} msgs/s delivered after {t} s", a.received.iter().sum::<u64>()));
            }
        }
        if tokio::time::Instant::now() >= end || stop.is_cancelled() {
            let x = w.window(t.saturating_sub(1));
            return (
                false,
                format!(
                    "after {} s: {} of {subs} subscriber(s) subscribed, {} publisher(s) connected, {} failed \
                     connection attempt(s), {} msgs/s sent, {} delivered",
                    within.as_secs(),
                    w.subscribed(),
                    x.publishers_connected,
                    x.connect_failures,
                    x.sent.iter().sum::<u64>(),
                    x.received.iter().sum::<u64>()
                ),
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests;
