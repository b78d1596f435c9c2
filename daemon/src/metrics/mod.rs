//! Prometheus metrics for operators (`chaosd serve --metrics-listen`).
//!
//! Nothing here is threaded through the drivers. Two sources:
//! - what passed by: injections, counted by the gRPC service around its
//!   engine call, and recoveries, followed on the engine's event stream
//!   (the one `chaosctl watch` reads), each with its latency;
//! - what holds now, read at scrape time: experiments and their packet
//!   counters through `Engine::list` (what `chaosctl list --all` shows),
//!   running stressors from /proc, and the facts of the start (probe
//!   results as `chaosctl status` shows them, what reconciling did).
//!
//! A series that names an experiment (`id` label) exists only while that
//! experiment is active, so the number of series stays bounded.

pub mod http;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::Registry,
};
use tokio::sync::broadcast;

use crate::{
    engine::{Engine, EventKind, Reconciled},
    experiment::{Experiment, State},
    probe::HostProbe,
    spec::{Fault, ProcessFault, StressFault},
};

/// Every fault kind, named as `chaosctl status` names them.
pub const FAULT_KINDS: [&str; 11] = [
    "loss",
    "partition",
    "bandwidth",
    "delay",
    "duplicate",
    "corrupt",
    "reorder",
    "stress-cpu",
    "stress-memory",
    "kill",
    "pause",
];

const STATES: [State; 7] = [
    State::Pending,
    State::Injecting,
    State::Active,
    State::Recovering,
    State::Recovered,
    State::Failed,
    State::Expired,
];

/// Outcomes of an Inject request: done, turned down for what it asked
/// (invalid, conflict, target missing, fault unavailable), or failed while
/// carrying it out.
pub const INJECT_RESULTS: [&str; 3] = ["ok", "refused", "failed"];

/// How a recovery ended: the experiment's final state.
const RECOVER_RESULTS: [&str; 3] = ["recovered", "expired", "failed"];

/// From 100 µs (a loss rule into a namespace that already has the
/// classifier) to 5 s (stressors, a stalled kernel).
const LATENCY_BUCKETS: [f64; 15] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

pub fn fault_kind(f: &Fault) -> &'static str {
    match f {
        Fault::Network(n) => n.action.name(),
        Fault::Stress(StressFault::Cpu { .. }) => "stress-cpu",
        Fault::Stress(StressFault::Memory { .. }) => "stress-memory",
        Fault::Process(ProcessFault::Kill { .. }) => "kill",
        Fault::Process(ProcessFault::Pause) => "pause",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindResult {
    kind: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

type Latency = Family<KindLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The registry and the counters that hooks update.
pub struct Metrics {
    registry: Registry,
    injections: Family<KindResult, Counter>,
    recoveries: Family<KindResult, Counter>,
    inject_seconds: Latency,
    recover_seconds: Latency,
}

impl Metrics {
    /// Metrics of a running daemon: `engine` is read at each scrape.
    pub fn new(engine: Arc<Engine>, host: &HostProbe, reconciled: &Reconciled) -> Self {
        let mut m = Self::counters_only();
        m.registry.register_collector(Box::new(Now { engine, start: StartFacts::new(host, reconciled) }));
        m
    }

    /// The counters and histograms, every kind and result at zero from the
    /// start: a rate over a series that appears with its first increment
    /// would miss that increment.
    fn counters_only() -> Self {
        let mut registry = Registry::default();
        let injections = Family::<KindResult, Counter>::default();
        let recoveries = Family::<KindResult, Counter>::default();
        let inject_seconds: Latency = Family::new_with_constructor(latency_histogram);
        let recover_seconds: Latency = Family::new_with_constructor(latency_histogram);
        for kind in FAULT_KINDS {
            for result in INJECT_RESULTS {
                let _ = injections.get_or_create(&KindResult { kind, result });
            }
            for result in RECOVER_RESULTS {
                let _ = recoveries.get_or_create(&KindResult { kind, result });
            }
            let _ = inject_seconds.get_or_create(&KindLabel { kind });
            let _ = recover_seconds.get_or_create(&KindLabel { kind });
        }
        // Inject requests refused before their fault could be read.
        for result in INJECT_RESULTS {
            let _ = injections.get_or_create(&KindResult { kind: "unknown", result });
        }
        registry.register(
            "chaosd_injections",
            "Inject requests by fault kind and result (ok, refused: the request was turned down for what it asked, failed: the kernel or the journal failed)",
            injections.clone(),
        );
        registry.register(
            "chaosd_recoveries",
            "Experiments that ended after being in force, by fault kind and final state (recovered on request, expired, failed)",
            recoveries.clone(),
        );
        registry.register(
            "chaosd_inject_duration_seconds",
            "Time from an Inject request reaching the engine until its fault is in force (successful injections)",
            inject_seconds.clone(),
        );
        registry.register(
            "chaosd_recover_duration_seconds",
            "Time to remove an experiment's fault (recovering until its final state)",
            recover_seconds.clone(),
        );
        Self { registry, injections, recoveries, inject_seconds, recover_seconds }
    }

    /// An Inject request's outcome (`kind` "unknown" when its fault could
    /// not be read). `took` is observed for successful ones only.
    pub fn injected(&self, kind: &'static str, result: Result<Duration, tonic::Code>) {
        let result_label = match result {
            Ok(took) => {
                self.inject_seconds.get_or_create(&KindLabel { kind }).observe(took.as_secs_f64());
                "ok"
            }
            Err(tonic::Code::Internal | tonic::Code::Unknown) => "failed",
            Err(_) => "refused",
        };
        self.injections.get_or_create(&KindResult { kind, result: result_label }).inc();
    }

    /// Follows the engine's state changes and counts recoveries: every
    /// experiment that went through `recovering` (recover, expiry, a target
    /// gone, shutdown) until its final state. Runs until the engine's event
    /// channel closes.
    pub async fn follow(self: Arc<Self>, mut events: broadcast::Receiver<crate::engine::Event>) {
        let mut recovering = HashMap::new();
        loop {
            match events.recv().await {
                Ok(ev) if ev.kind == EventKind::StateChanged => {
                    self.state_changed(&mut recovering, &ev.experiment, ev.at)
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "metrics missed state changes: some recoveries are not counted");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn state_changed(&self, recovering: &mut HashMap<String, SystemTime>, exp: &Experiment, at: SystemTime) {
        if exp.state == State::Recovering {
            recovering.insert(exp.id.clone(), at);
            return;
        }
        if !exp.state.is_terminal() {
            return;
        }
        // A failed injection or a kill (done once sent) ends without
        // having been recovered: not a recovery.
        let Some(since) = recovering.remove(&exp.id) else { return };
        let kind = fault_kind(&exp.fault);
        let result = State::name(exp.state);
        self.recoveries.get_or_create(&KindResult { kind, result }).inc();
        let took = at.duration_since(since).unwrap_or_default();
        self.recover_seconds.get_or_create(&KindLabel { kind }).observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    /// Reads the engine: call it off the async runtime.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }
}

/// What the start of the daemon found, exported as it was.
#[derive(Debug)]
struct StartFacts {
    faults: Vec<(&'static str, bool)>,
    probes: Vec<(&'static str, bool)>,
    reconciled: [(&'static str, usize); 3],
}

impl StartFacts {
    fn new(host: &HostProbe, r: &Reconciled) -> Self {
        Self {
            faults: host.fault_availability().into_iter().map(|f| (f.fault, f.available)).collect(),
            probes: vec![
                ("bpf_prog_load", host.bpf_prog_load.available),
                ("btf", host.btf.available),
                ("netem", host.netem.available),
                ("ifb", host.ifb.available),
                ("htb", host.htb.available),
                ("clsact", host.clsact.available),
                ("tcx", host.tcx.available),
            ],
            reconciled: [("resumed", r.resumed.len()), ("reverted", r.reverted.len()), ("swept", r.swept.len())],
        }
    }
}

/// Read at each scrape.
struct Now {
    engine: Arc<Engine>,
    start: StartFacts,
}

impl std::fmt::Debug for Now {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Now").field("start", &self.start).finish_non_exhaustive()
    }
}

fn gauge<S: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (S, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter<S: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (S, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in rows {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Now {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let experiments = match self.engine.list(true) {
            Ok(list) => list,
            Err(e) => {
                // The start facts and stressors are still worth a scrape;
                // missing experiment series show the gap.
                tracing::warn!(error = %e, "metrics: cannot list experiments");
                Vec::new()
            }
        };
        let mut by_kind_state: HashMap<(&str, &str), i64> = HashMap::new();
        for kind in FAULT_KINDS {
            for state in STATES {
                by_kind_state.insert((kind, State::name(state)), 0);
            }
        }
        for e in &experiments {
            *by_kind_state.entry((fault_kind(&e.fault), State::name(e.state))).or_default() += 1;
        }
        let mut rows: Vec<_> = by_kind_state.into_iter().collect();
        rows.sort();
        gauge(
            &mut enc,
            "chaosd_experiments",
            "Experiments by fault kind and state: the active ones and the ended ones the journal keeps (chaosctl list --all)",
            rows.into_iter().map(|((kind, state), n)| ([("kind", kind), ("state", state)], n)),
        )?;

        let active: Vec<(&Experiment, [(&str, String); 3])> = experiments
            .iter()
            .filter(|e| e.state == State::Active)
            .map(|e| {
                (
                    e,
                    [
                        ("id", e.id.clone()),
                        ("kind", fault_kind(&e.fault).to_string()),
                        ("target", e.target.to_string()),
                    ],
                )
            })
            .collect();
        gauge(
            &mut enc,
            "chaosd_experiment_active",
            "1 while an experiment is in force; the series ends with the experiment (fault windows)",
            active.iter().map(|(_, l)| (l.clone(), 1)),
        )?;
        let network: Vec<_> = active.iter().filter(|(e, _)| matches!(e.fault, Fault::Network(_))).collect();
        counter(
            &mut enc,
            "chaosd_experiment_packets_matched",
            "Packets an active network fault's selector matched",
            network.iter().map(|(e, l)| (l.clone(), e.counters.packets_matched)),
        )?;
        counter(
            &mut enc,
            "chaosd_experiment_packets_dropped",
            "Packets an active network fault dropped (loss, partition)",
            network.iter().map(|(e, l)| (l.clone(), e.counters.packets_dropped)),
        )?;
        counter(
            &mut enc,
            "chaosd_experiment_packets_delayed",
            "Packets an active network fault sent to its netem or HTB class",
            network.iter().map(|(e, l)| (l.clone(), e.counters.packets_delayed)),
        )?;

        let stressors = stressors_running();
        gauge(
            &mut enc,
            "chaosd_stressors_running",
            "Stressor processes of this daemon that are running, by fault kind",
            ["stress-cpu", "stress-memory"].map(|k| ([("kind", k)], stressors.get(k).copied().unwrap_or(0))),
        )?;
        gauge(
            &mut enc,
            "chaosd_fault_available",
            "1 when this host can inject the fault kind, as probed at start (chaosctl status says why not)",
            self.start.faults.iter().map(|(f, ok)| ([("fault", *f)], i64::from(*ok))),
        )?;
        gauge(
            &mut enc,
            "chaosd_probe_available",
            "1 when the kernel facility worked when tried at start (chaosctl status)",
            self.start.probes.iter().map(|(p, ok)| ([("probe", *p)], i64::from(*ok))),
        )?;
        gauge(
            &mut enc,
            "chaosd_reconciled_at_start",
            "What reconciling the journal with the kernel did at start: experiments resumed, experiments reverted, leftover objects swept",
            self.start.reconciled.iter().map(|(o, n)| ([("outcome", *o)], *n as i64)),
        )?;
        gauge(&mut enc, "chaosd_build_info", "Always 1; the daemon's version", [([("version", crate::VERSION)], 1)])
    }
}

/// Stressors are children of this daemon started as `chaosd stressor
/// --experiment ID --parent PID MODE ...`.
fn stressors_running() -> HashMap<&'static str, i64> {
    use crate::process::procfs;
    let me = std::process::id();
    let mut out = HashMap::new();
    for pid in procfs::all_pids().unwrap_or_default() {
        if !procfs::stat(pid).is_ok_and(|st| st.ppid == me && !st.is_dead()) {
            continue;
        }
        let argv = procfs::cmdline(pid).unwrap_or_default();
        if let Some(kind) = stressor_kind(&argv) {
            *out.entry(kind).or_default() += 1;
        }
    }
    out
}

fn stressor_kind(argv: &[String]) -> Option<&'static str> {
    if argv.get(1).map(String::as_str) != Some("stressor") {
        return None;
    }
    // The mode follows the `--parent PID` pair.
    let mode = argv.iter().position(|a| a == "--parent").and_then(|i| argv.get(i + 2))?;
    match mode.as_str() {
        "cpu" => Some("stress-cpu"),
        "memory" => Some("stress-memory"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        experiment::Experiment,
        spec::{Direction, NetAction, NetworkFault, Protocol, Selector, Target},
    };

    fn loss() -> Experiment {
        let selector = Selector {
            devices: vec![],
            protocol: Protocol::All,
            ports: vec![],
            source_ports: vec![],
            destination_ports: vec![],
            peers: vec![],
            direction: Direction::Both,
        };
        let fault =
            Fault::Network(NetworkFault { selector, action: NetAction::Loss { percent: 20.0, correlation: 0.0 } });
        Experiment::new("0000abcd".into(), Target::Host, fault, None, false, SystemTime::now())
    }

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line {prefix} in:\n{text}"))
    }

    #[test]
    fn every_kind_and_result_is_exported_at_zero_from_the_start() {
        let text = Metrics::counters_only().encode();
        for kind in FAULT_KINDS {
            for result in INJECT_RESULTS {
                line(&text, &format!("chaosd_injections_total{{kind=\"{kind}\",result=\"{result}\"}} 0"));
            }
            line(&text, &format!("chaosd_inject_duration_seconds_count{{kind=\"{kind}\"}} 0"));
        }
        line(&text, "chaosd_recoveries_total{kind=\"pause\",result=\"expired\"} 0");
    }

    #[test]
    fn injections_are_counted_by_result_and_only_successes_timed() {
        let m = Metrics::counters_only();
        m.injected("loss", Ok(Duration::from_micros(800)));
        m.injected("loss", Err(tonic::Code::InvalidArgument));
        m.injected("loss", Err(tonic::Code::Internal));
        m.injected("unknown", Err(tonic::Code::InvalidArgument));
        let text = m.encode();
        line(&text, "chaosd_injections_total{kind=\"loss\",result=\"ok\"} 1");
        line(&text, "chaosd_injections_total{kind=\"loss\",result=\"refused\"} 1");
        line(&text, "chaosd_injections_total{kind=\"loss\",result=\"failed\"} 1");
        line(&text, "chaosd_injections_total{kind=\"unknown\",result=\"refused\"} 1");
        line(&text, "chaosd_inject_duration_seconds_count{kind=\"loss\"} 1");
        line(&text, "chaosd_inject_duration_seconds_bucket{kind=\"loss\",le=\"0.0005\"} 0");
        line(&text, "chaosd_inject_duration_seconds_bucket{kind=\"loss\",le=\"0.001\"} 1");
    }

    #[test]
    fn a_recovery_is_an_experiment_that_went_through_recovering() {
        let m = Metrics::counters_only();
        let mut open = HashMap::new();
        let t0 = SystemTime::now();
        let mut e = loss();
        // Injected and ended by a failed apply: not a recovery.
        e.state = State::Failed;
        m.state_changed(&mut open, &e, t0);
        e.state = State::Recovering;
        m.state_changed(&mut open, &e, t0);
        e.state = State::Expired;
        m.state_changed(&mut open, &e, t0 + Duration::from_millis(3));
        let text = m.encode();
        line(&text, "chaosd_recoveries_total{kind=\"loss\",result=\"expired\"} 1");
        line(&text, "chaosd_recoveries_total{kind=\"loss\",result=\"failed\"} 0");
        line(&text, "chaosd_recover_duration_seconds_bucket{kind=\"loss\",le=\"0.0025\"} 0");
        line(&text, "chaosd_recover_duration_seconds_bucket{kind=\"loss\",le=\"0.005\"} 1");
        assert!(open.is_empty(), "an ended experiment is forgotten");
    }

    #[test]
    fn stressors_are_told_by_their_mode() {
        let argv = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let cpu = argv("chaosd-stressor stressor --experiment 0a0b0c0d --parent 7 cpu --load 80");
        assert_eq!(stressor_kind(&cpu), Some("stress-cpu"));
        let mem = argv("chaosd-stressor stressor --experiment cpu --parent 7 memory --bytes 10");
        assert_eq!(stressor_kind(&mem), Some("stress-memory"));
        assert_eq!(stressor_kind(&argv("chaosd pause-guardian --parent 7 cpu")), None);
    }
}
