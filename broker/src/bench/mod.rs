//! `broker bench`: a load client for any MQTT broker. N publishers, M
//! subscribers, a QoS mix; every payload carries publisher, QoS, sequence
//! number and send time, so the report gives per QoS: sent, received, lost,
//! duplicated, out of order, throughput and end-to-end latency. The load
//! itself is the mqtt-workload crate; this is its command line.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

pub use mqtt_workload::stats::QosReport;
use mqtt_workload::{Fanout, Group, Protocol, QosMix, Reconnect, Session, Spec, Workload};

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct BenchArgs {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub addr: SocketAddr,
    /// Broker the subscribers connect to, when not --addr: another node of
    /// a cluster, so that every message crosses it. Publishing starts once a
    /// probe from --addr reaches every subscriber (the routes have spread).
    #[arg(long)]
    pub sub_addr: Option<SocketAddr>,
    /// MQTT protocol: 3 (3.1.1) or 5.
    #[arg(long, default_value_t = 3)]
    pub protocol: u8,
    #[arg(long, default_value_t = 10)]
    pub publishers: usize,
    #[arg(long, default_value_t = 10)]
    pub subscribers: usize,
    /// Distinct topics; publisher i publishes on topic i % topics (0: one per publisher).
    #[arg(long, default_value_t = 0)]
    pub topics: usize,
    /// `split`: subscriber j takes topic j % topics; `all`: every subscriber takes every topic.
    #[arg(long, default_value = "split")]
    pub sub_mode: String,
    /// Messages per second per publisher (0: as fast as the inflight window allows).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Percent of QoS 0/1/2 messages, e.g. 40/50/10.
    #[arg(long, default_value = "40/50/10")]
    pub qos_mix: String,
    /// Payload bytes (at least 24: the measurement header).
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds to wait for stragglers after publishing stops.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Persistent sessions (clean session 0 / session expiry 3600 s).
    #[arg(long)]
    pub persistent: bool,
    /// Unacknowledged QoS 1/2 messages per publisher.
    #[arg(long, default_value_t = 100)]
    pub inflight: usize,
    /// Topic prefix; a unique one keeps runs apart.
    #[arg(long, default_value = "bench")]
    pub prefix: String,
    /// Client id prefix.
    #[arg(long, default_value = "bench")]
    pub id_prefix: String,
    /// Print the report as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write every end-to-end latency sample (microseconds, one per
    /// line) to this file, so several runs can be pooled.
    #[arg(long)]
    pub latency_samples: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub args: BenchArgs,
    pub window_s: f64,
    pub publisher_reconnects: u64,
    pub subscriber_reconnects: u64,
    pub qos: [QosReport; 3],
    pub total: QosReport,
}

fn parse_mix(s: &str) -> anyhow::Result<QosMix> {
    let v: Vec<u32> = s.split('/').map(|x| x.trim().parse()).collect::<Result<_, _>>()?;
    anyhow::ensure!(
        v.len() == 3 && v.iter().sum::<u32>() == 100,
        "--qos-mix needs three percentages adding up to 100, got {s:?}"
    );
    Ok(QosMix { qos0: v[0], qos1: v[1], qos2: v[2] })
}

/// The typed workload the flags describe.
pub fn spec(a: &BenchArgs) -> anyhow::Result<Spec> {
    let protocol = match a.protocol {
        3 | 4 => Protocol::V3,
        5 => Protocol::V5,
        p => anyhow::bail!("--protocol {p}: expected 3 or 5"),
    };
    let fanout = match a.sub_mode.as_str() {
        "split" => Fanout::Split,
        "all" => Fanout::All,
        _ => anyhow::bail!("--sub-mode is split or all"),
    };
    let spec = Spec {
        protocol,
        publishers: vec![Group { addr: a.addr, count: a.publishers }],
        subscribers: vec![Group { addr: a.sub_addr.unwrap_or(a.addr), count: a.subscribers }],
        rate: a.rate,
        qos_mix: parse_mix(&a.qos_mix)?,
        topics: a.topics,
        fanout,
        payload: a.payload,
        session: if a.persistent { Session::Persistent } else { Session::Clean },
        reconnect: Reconnect::default(),
        inflight: a.inflight.max(1),
        prefix: a.prefix.clone(),
        id_prefix: a.id_prefix.clone(),
    };
    spec.validate().map_err(anyhow::Error::msg)?;
    Ok(spec)
}

/// Runs one benchmark and returns its report.
pub async fn execute(a: &BenchArgs) -> anyhow::Result<Report> {
    let spec = spec(a)?;
    let subscribers = spec.subscriber_count();
    let w = Workload::start(spec, Duration::from_secs(15)).await.map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        w.subscribed() == subscribers,
        "only {} of {subscribers} subscribers subscribed within 15 s",
        w.subscribed()
    );
    tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
    let s = w.stop(Duration::from_secs_f64(a.drain)).await;
    if let Some(path) = &a.latency_samples {
        use std::fmt::Write as _;
        let mut text = String::new();
        for v in s.latency_us.iter().flatten() {
            let _ = writeln!(text, "{v}");
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(Report {
        args: a.clone(),
        window_s: s.window_s,
        publisher_reconnects: s.publisher_reconnects,
        subscriber_reconnects: s.subscriber_reconnects,
        qos: s.qos,
        total: s.total,
    })
}

pub fn table(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "window {:.2}s  reconnects: publishers {} subscribers {}",
        r.window_s, r.publisher_reconnects, r.subscriber_reconnects
    );
    let _ = writeln!(
        o,
        "{:<5} {:>9} {:>9} {:>9} {:>9} {:>7} {:>6} {:>6} {:>11} {:>8} {:>8} {:>8} {:>8}",
        "qos",
        "sent",
        "acked",
        "expected",
        "received",
        "lost",
        "dup",
        "ooo",
        "msg/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms"
    );
    let rows = r.qos.iter().enumerate().map(|(q, x)| (q.to_string(), x)).chain([("all".to_string(), &r.total)]);
    for (name, x) in rows {
        let _ = writeln!(
            o,
            "{:<5} {:>9} {:>9} {:>9} {:>9} {:>7} {:>6} {:>6} {:>11.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
            name,
            x.sent,
            x.acked,
            x.expected,
            x.received,
            x.lost,
            x.duplicated,
            x.out_of_order,
            x.throughput_msgs_per_s,
            x.latency_ms.p50,
            x.latency_ms.p95,
            x.latency_ms.p99,
            x.latency_ms.max
        );
    }
    o
}

pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    let r = execute(&a).await?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print!("{}", table(&r));
    }
    Ok(())
}
