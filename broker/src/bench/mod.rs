//! `broker bench`: a load client for any MQTT broker. N publishers, M
//! subscribers, a QoS mix; every payload carries publisher, QoS, sequence
//! number and send time, so the report gives per QoS: sent, received, lost,
//! duplicated, out of order, throughput and end-to-end latency.

mod stats;
mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::codec::Version;
pub use stats::{QosReport, SubStats};
use worker::{Common, PubCfg, SubCfg};

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct BenchArgs {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub addr: SocketAddr,
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

fn parse_mix(s: &str) -> anyhow::Result<[u32; 3]> {
    let v: Vec<u32> = s.split('/').map(|x| x.trim().parse()).collect::<Result<_, _>>()?;
    anyhow::ensure!(
        v.len() == 3 && v.iter().sum::<u32>() == 100,
        "--qos-mix needs three percentages adding up to 100, got {s:?}"
    );
    Ok([v[0], v[1], v[2]])
}

/// Runs one benchmark and returns its report.
pub async fn execute(a: &BenchArgs) -> anyhow::Result<Report> {
    let mix = parse_mix(&a.qos_mix)?;
    anyhow::ensure!(a.publishers > 0 && a.subscribers > 0, "need at least one publisher and one subscriber");
    anyhow::ensure!(matches!(a.sub_mode.as_str(), "split" | "all"), "--sub-mode is split or all");
    let version = match a.protocol {
        3 | 4 => Version::V311,
        5 => Version::V5,
        p => anyhow::bail!("--protocol {p}: expected 3 or 5"),
    };
    let common = Common { addr: a.addr, version, persistent: a.persistent };
    let topics = if a.topics == 0 { a.publishers } else { a.topics };
    let all = a.sub_mode == "all";
    let covers = move |s: usize, p: usize| all || s % topics == p % topics;

    let stop = CancellationToken::new();
    let ready = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(AtomicU64::new(0));
    let last_rx = Arc::new(AtomicU64::new(0));
    let mut subs = Vec::new();
    for j in 0..a.subscribers {
        let filter = if all { format!("{}/#", a.prefix) } else { format!("{}/{}", a.prefix, j % topics) };
        subs.push(tokio::spawn(worker::subscriber(SubCfg {
            common: common.clone(),
            id: format!("{}-sub-{j}", a.id_prefix),
            filter,
            stop: stop.clone(),
            ready: ready.clone(),
            progress: progress.clone(),
            last_rx: last_rx.clone(),
        })));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while ready.load(Relaxed) < a.subscribers {
        if Instant::now() > deadline {
            stop.cancel();
            anyhow::bail!("only {} of {} subscribers subscribed within 15 s", ready.load(Relaxed), a.subscribers);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start = Instant::now();
    let start_ns = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let stop_at = start + Duration::from_secs_f64(a.duration);
    let give_up_at = stop_at + Duration::from_secs_f64(a.drain);
    let mut pubs = Vec::new();
    for i in 0..a.publishers {
        pubs.push(tokio::spawn(worker::publisher(PubCfg {
            common: common.clone(),
            id: format!("{}-pub-{i}", a.id_prefix),
            index: i as u32,
            topic: format!("{}/{}", a.prefix, i % topics),
            rate: a.rate,
            mix,
            payload: a.payload,
            inflight: a.inflight.max(1),
            stop_at,
            give_up_at,
        })));
    }
    let mut sent = Vec::new();
    let mut acked = Vec::new();
    let mut pub_reconnects = 0;
    for p in pubs {
        let r = p.await?;
        sent.push(r.sent);
        acked.push(r.acked);
        pub_reconnects += r.reconnects;
    }
    let expected: u64 = (0..a.subscribers)
        .flat_map(|s| (0..a.publishers).filter(move |p| covers(s, *p)))
        .map(|p| sent[p].iter().sum::<u64>())
        .sum();
    while progress.load(Relaxed) < expected && Instant::now() < give_up_at {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let mut sub_stats = Vec::new();
    let mut sub_reconnects = 0;
    for s in subs {
        let r = s.await?;
        sub_stats.push(r.stats);
        sub_reconnects += r.reconnects;
    }
    let last = last_rx.load(Relaxed);
    let window_s = if last > start_ns { (last - start_ns) as f64 / 1e9 } else { start.elapsed().as_secs_f64() };
    let qos = stats::report(&sub_stats, &sent, &acked, &covers, window_s);
    let mut total = QosReport::default();
    for q in &qos {
        total.sent += q.sent;
        total.acked += q.acked;
        total.expected += q.expected;
        total.received += q.received;
        total.lost += q.lost;
        total.duplicated += q.duplicated;
        total.out_of_order += q.out_of_order;
        total.throughput_msgs_per_s += q.throughput_msgs_per_s;
    }
    let all_lat: [QosReport; 1] = {
        let mut s = SubStats::default();
        for st in &sub_stats {
            for q in 0..3 {
                s.latency_us[0].extend_from_slice(&st.latency_us[q]);
            }
        }
        if let Some(path) = &a.latency_samples {
            use std::fmt::Write as _;
            let mut text = String::with_capacity(s.latency_us[0].len() * 5);
            for v in &s.latency_us[0] {
                let _ = writeln!(text, "{v}");
            }
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        let r = stats::report(&[s], &[[0, 0, 0]], &[[0, 0, 0]], &|_, _| true, 1.0);
        [r[0].clone()]
    };
    total.latency_ms = all_lat[0].latency_ms.clone();
    Ok(Report {
        args: a.clone(),
        window_s,
        publisher_reconnects: pub_reconnects,
        subscriber_reconnects: sub_reconnects,
        qos,
        total,
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
