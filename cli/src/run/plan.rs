//! The plan file: TOML read with serde, then checked as a whole before
//! anything starts. Syntax and unknown keys are reported by the toml crate
//! with line and column; meaning errors name the case and, for faults, the
//! line of the fault's table.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::parse;

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Shown in the report.
    #[serde(default)]
    pub name: String,
    pub sut: Sut,
    pub workload: Workload,
    #[serde(default)]
    pub thresholds: Thresholds,
    #[serde(rename = "case", default)]
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Sut {
    /// The runner starts scripts/cluster-up and removes it at the end.
    Local {
        #[serde(default = "three")]
        nodes: u32,
        /// Script directory (default: scripts/ next to the working dir).
        #[serde(default)]
        scripts: Option<String>,
        /// Broker binary (default: cluster-up's own choice).
        #[serde(default)]
        broker: Option<String>,
        #[serde(default = "two_s", with = "dur")]
        restart_delay: Duration,
    },
    /// Nodes that already run; the runner only reads and injects.
    Attach {
        /// Network namespace (a name under /run/netns) the workload runs in.
        #[serde(default)]
        client_netns: Option<String>,
        #[serde(rename = "node")]
        nodes: Vec<AttachNode>,
    },
}

fn three() -> u32 {
    3
}
fn two_s() -> Duration {
    Duration::from_secs(2)
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct AttachNode {
    pub name: String,
    pub mqtt: std::net::SocketAddr,
    #[serde(default)]
    pub http: Option<std::net::SocketAddr>,
    /// Where network faults go: a named netns.
    #[serde(default)]
    pub netns: Option<String>,
    /// The broker's pid, or a file holding it (read at each use).
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub pid_file: Option<String>,
    /// Where stress goes when no pid is known.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// The broker's process name on its host (e.g. "broker"): kill and pause
    /// go to every process of that name when no pid is known, as on a
    /// remote host whose pid the runner cannot read.
    #[serde(default)]
    pub process: Option<String>,
    /// The chaosd of this node's host, over its TLS port; without it the
    /// runner's own daemon (--socket or --endpoint).
    #[serde(default)]
    pub chaosd: Option<NodeChaosd>,
}

/// `chaosd serve --listen-tls` on a node's host, with the runner's client
/// certificate. Relative paths are from the plan's directory.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeChaosd {
    /// https://HOST:PORT
    #[serde(deserialize_with = "endpoint_url")]
    pub endpoint: String,
    /// The CA that signed the daemon's certificate.
    pub ca: String,
    /// The runner's client certificate and key.
    pub cert: String,
    pub key: String,
}

fn endpoint_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    crate::tls::parse_url(&s).map_err(serde::de::Error::custom)?;
    Ok(s)
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    #[serde(default = "v5")]
    pub protocol: mqtt_workload::Protocol,
    pub publishers: Vec<Clients>,
    pub subscribers: Vec<Clients>,
    /// Messages per second per publisher.
    pub rate: f64,
    #[serde(default)]
    pub qos_mix: mqtt_workload::QosMix,
    #[serde(default)]
    pub topics: usize,
    #[serde(default = "all")]
    pub fanout: mqtt_workload::Fanout,
    #[serde(default = "payload")]
    pub payload: usize,
    #[serde(default = "persistent")]
    pub session: mqtt_workload::Session,
    #[serde(default)]
    pub reconnect: ReconnectPolicy,
    #[serde(default = "inflight")]
    pub inflight: usize,
    /// Longest wait for every subscriber to subscribe and messages to flow.
    #[serde(default = "steady", with = "dur")]
    pub steady_state: Duration,
    /// After the last case: how long in-flight messages may still arrive.
    #[serde(default = "drain", with = "dur")]
    pub drain: Duration,
}

fn v5() -> mqtt_workload::Protocol {
    mqtt_workload::Protocol::V5
}
fn all() -> mqtt_workload::Fanout {
    mqtt_workload::Fanout::All
}
fn payload() -> usize {
    128
}
fn persistent() -> mqtt_workload::Session {
    mqtt_workload::Session::Persistent
}
fn inflight() -> usize {
    100
}
fn steady() -> Duration {
    Duration::from_secs(15)
}
fn drain() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ReconnectPolicy {
    #[serde(with = "dur")]
    pub initial: Duration,
    #[serde(with = "dur")]
    pub max: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self { initial: Duration::from_millis(100), max: Duration::from_secs(1) }
    }
}

/// `count` clients on a node of the SUT (or on a plain address).
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Clients {
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub addr: Option<std::net::SocketAddr>,
    pub count: usize,
}

/// Pass criteria. Absent keys: no criterion (losses at QoS 1/2 and QoS 2
/// duplicates default to 0).
#[derive(Debug, Deserialize, Serialize, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    pub max_lost_qos0: Option<u64>,
    pub max_lost_qos1: Option<u64>,
    pub max_lost_qos2: Option<u64>,
    pub max_duplicates_qos2: Option<u64>,
    /// p99 end-to-end latency during the fault, milliseconds.
    pub max_p99_during_ms: Option<f64>,
    /// Delivered msgs/s during the fault over the baseline's, 0..=1.
    pub min_throughput_ratio: Option<f64>,
    #[serde(default, with = "opt_dur")]
    pub max_recovery: Option<Duration>,
    /// Delivery counts as back once it is at least this share of the
    /// baseline (default 0.8).
    pub recovery_band: Option<f64>,
}

impl Thresholds {
    /// `self` with what `over` sets replaced.
    pub fn merged(&self, over: &Thresholds) -> Thresholds {
        Thresholds {
            max_lost_qos0: over.max_lost_qos0.or(self.max_lost_qos0),
            max_lost_qos1: over.max_lost_qos1.or(self.max_lost_qos1).or(Some(0)),
            max_lost_qos2: over.max_lost_qos2.or(self.max_lost_qos2).or(Some(0)),
            max_duplicates_qos2: over.max_duplicates_qos2.or(self.max_duplicates_qos2).or(Some(0)),
            max_p99_during_ms: over.max_p99_during_ms.or(self.max_p99_during_ms),
            min_throughput_ratio: over.min_throughput_ratio.or(self.min_throughput_ratio),
            max_recovery: over.max_recovery.or(self.max_recovery),
            recovery_band: over.recovery_band.or(self.recovery_band).or(Some(0.8)),
        }
    }
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    #[serde(with = "dur")]
    pub baseline: Duration,
    /// How long the fault is held.
    #[serde(with = "dur")]
    pub fault_time: Duration,
    #[serde(with = "dur")]
    pub recovery: Duration,
    /// Faults together (`parallel`, the default) or one after the other,
    /// each for fault_time / n (`sequence`).
    #[serde(default)]
    pub mode: Mode,
    /// Read as tables, so that a fault's errors can name its line.
    #[serde(rename = "fault")]
    pub raw_faults: Vec<Spanned<toml::Table>>,
    /// Filled by [`check`] from `raw_faults`.
    #[serde(skip_deserializing)]
    pub faults: Vec<Fault>,
    #[serde(default)]
    pub thresholds: Thresholds,
}

#[derive(Debug, Deserialize, Serialize, Clone, Copy, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Parallel,
    Sequence,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    #[serde(skip)]
    pub action: Action,
    /// A node name, "all", or "random" (with `seed`).
    pub target: String,
    #[serde(default)]
    pub seed: Option<u64>,
    /// Network faults: ports (either side), both/egress/ingress, protocol.
    #[serde(default)]
    pub ports: Vec<u32>,
    #[serde(default)]
    pub direction: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    /// Peers by node name or CIDR.
    #[serde(default)]
    pub peers: Vec<String>,
    /// How long this fault lasts, at most the case's fault_time (default).
    #[serde(default, with = "opt_dur")]
    pub duration: Option<Duration>,
    /// Line of the fault's table in the plan.
    #[serde(skip)]
    pub line: usize,
}

#[derive(Debug, Deserialize, Serialize, Clone, Default)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Action {
    Loss {
        percent: f64,
        #[serde(default)]
        correlation: f64,
    },
    #[default]
    Partition,
    Delay {
        #[serde(with = "dur")]
        latency: Duration,
        #[serde(default, with = "opt_dur")]
        jitter: Option<Duration>,
        #[serde(default)]
        correlation: f64,
    },
    Bandwidth {
        rate: String,
        #[serde(default)]
        burst: u32,
    },
    Duplicate {
        percent: f64,
        #[serde(default)]
        correlation: f64,
    },
    Corrupt {
        percent: f64,
        #[serde(default)]
        correlation: f64,
    },
    Reorder {
        percent: f64,
        #[serde(default)]
        correlation: f64,
        #[serde(with = "dur")]
        latency: Duration,
    },
    Cpu {
        #[serde(default = "one")]
        workers: u32,
        load: u32,
    },
    Memory {
        size: String,
        #[serde(default = "one")]
        workers: u32,
    },
    Kill {
        #[serde(default)]
        signal: Option<String>,
    },
    Pause,
    /// Faults chaosd does not have yet (io, clock, dns): listed in the
    /// report as not run; their other keys are kept as written.
    #[serde(skip)]
    NotYet {
        kind: String,
        params: toml::Table,
    },
}

/// Keys of a fault table that are not the action's own.
const COMMON_KEYS: [&str; 8] = ["target", "seed", "ports", "direction", "protocol", "peers", "duration", "kind"];
const NOT_YET: [&str; 3] = ["io", "clock", "dns"];

impl Fault {
    fn from_table(t: &toml::Table) -> Result<Fault, String> {
        let kind = t.get("kind").and_then(|v| v.as_str()).ok_or(
            "missing `kind`: one of loss, partition, delay, bandwidth, duplicate, corrupt, reorder, cpu, memory, \
             kill, pause (io, clock, dns: not in chaosd yet)",
        )?;
        let mut common = toml::Table::new();
        let mut own = toml::Table::new();
        for (k, v) in t {
            if COMMON_KEYS.contains(&k.as_str()) && k != "kind" {
                common.insert(k.clone(), v.clone());
            } else {
                own.insert(k.clone(), v.clone());
            }
        }
        let mut f: Fault = common.try_into().map_err(|e: toml::de::Error| e.message().to_string())?;
        f.action = if NOT_YET.contains(&kind) {
            own.remove("kind");
            Action::NotYet { kind: kind.to_string(), params: own }
        } else {
            own.try_into().map_err(|e: toml::de::Error| e.message().trim_end().to_string())?
        };
        Ok(f)
    }
}

fn one() -> u32 {
    1
}

impl Action {
    /// chaosd's name of the fault (as in `chaosctl status`).
    pub fn name(&self) -> &'static str {
        match self {
            Action::Loss { .. } => "loss",
            Action::Partition => "partition",
            Action::Delay { .. } => "delay",
            Action::Bandwidth { .. } => "bandwidth",
            Action::Duplicate { .. } => "duplicate",
            Action::Corrupt { .. } => "corrupt",
            Action::Reorder { .. } => "reorder",
            Action::Cpu { .. } => "stress-cpu",
            Action::Memory { .. } => "stress-memory",
            Action::Kill { .. } => "kill",
            Action::Pause => "pause",
            Action::NotYet { kind, .. } => match kind.as_str() {
                "io" => "io",
                "clock" => "clock",
                _ => "dns",
            },
        }
    }

    pub fn is_network(&self) -> bool {
        matches!(
            self,
            Action::Loss { .. }
                | Action::Partition
                | Action::Delay { .. }
                | Action::Bandwidth { .. }
                | Action::Duplicate { .. }
                | Action::Corrupt { .. }
                | Action::Reorder { .. }
        )
    }
}

/// Durations as strings: "500ms", "30s", "2m".
mod dur {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", v.as_millis()))
    }
}

mod opt_dur {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map(Some).map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(&format!("{}ms", v.as_millis())),
            None => s.serialize_none(),
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse::duration(s)?;
    if d.seconds < 0 || d.nanos < 0 {
        return Err(format!("'{s}' is negative: give a duration such as 500ms, 30s or 2m"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// Line and column (1-based) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |i| before.len() - i - 1) + 1;
    (line, col)
}

/// Reads a plan. Errors say where and what was expected.
pub fn parse(path: &str, text: &str) -> Result<Plan, String> {
    toml::from_str::<Plan>(text).map_err(|e| {
        let at = e.span().map(|s| line_col(text, s.start));
        let msg = e.message().trim_end().to_string();
        match at {
            Some((l, c)) => format!("{path}:{l}:{c}: {msg}"),
            None => format!("{path}: {msg}"),
        }
    })
}

/// Turns each case's fault tables into faults, naming the line of a bad one.
pub fn read_faults(path: &str, text: &str, plan: &mut Plan) -> Result<(), String> {
    for c in &mut plan.cases {
        c.faults.clear();
        for raw in &c.raw_faults {
            let (line, col) = line_col(text, raw.span().start);
            let mut f = Fault::from_table(raw.get_ref())
                .map_err(|e| format!("{path}:{line}:{col}: case '{}': fault: {e}", c.name))?;
            f.line = line;
            c.faults.push(f);
        }
    }
    Ok(())
}
