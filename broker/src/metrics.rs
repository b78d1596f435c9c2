//! Prometheus metrics: plain atomics, rendered in the text format on scrape.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Why a connection ended. The label set is fixed so every series exists
/// from the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    ClientDisconnect,
    Eof,
    IoError,
    KeepAliveTimeout,
    ConnectTimeout,
    Takeover,
    Malformed,
    ProtocolError,
    PacketTooLarge,
    ReceiveMaxExceeded,
    TopicAliasInvalid,
    TopicNameInvalid,
    UnsupportedVersion,
    NotAuthorized,
    ClientIdInvalid,
    Shutdown,
}

impl CloseReason {
    pub const ALL: [CloseReason; 16] = [
        CloseReason::ClientDisconnect,
        CloseReason::Eof,
        CloseReason::IoError,
        CloseReason::KeepAliveTimeout,
        CloseReason::ConnectTimeout,
        CloseReason::Takeover,
        CloseReason::Malformed,
        CloseReason::ProtocolError,
        CloseReason::PacketTooLarge,
        CloseReason::ReceiveMaxExceeded,
        CloseReason::TopicAliasInvalid,
        CloseReason::TopicNameInvalid,
        CloseReason::UnsupportedVersion,
        CloseReason::NotAuthorized,
        CloseReason::ClientIdInvalid,
        CloseReason::Shutdown,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CloseReason::ClientDisconnect => "client_disconnect",
            CloseReason::Eof => "eof",
            CloseReason::IoError => "io_error",
            CloseReason::KeepAliveTimeout => "keepalive_timeout",
            CloseReason::ConnectTimeout => "connect_timeout",
            CloseReason::Takeover => "takeover",
            CloseReason::Malformed => "malformed",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::PacketTooLarge => "packet_too_large",
            CloseReason::ReceiveMaxExceeded => "receive_maximum_exceeded",
            CloseReason::TopicAliasInvalid => "topic_alias_invalid",
            CloseReason::TopicNameInvalid => "topic_name_invalid",
            CloseReason::UnsupportedVersion => "unsupported_version",
            CloseReason::NotAuthorized => "not_authorized",
            CloseReason::ClientIdInvalid => "client_id_invalid",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    QueueFull,
    SlowConsumer,
    OfflineQos0,
    PacketTooLarge,
    Expired,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::QueueFull,
        DropReason::SlowConsumer,
        DropReason::OfflineQos0,
        DropReason::PacketTooLarge,
        DropReason::Expired,
    ];
    pub fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::OfflineQos0 => "offline_qos0",
            DropReason::PacketTooLarge => "packet_too_large",
            DropReason::Expired => "expired",
        }
    }
}

/// Upper bounds (seconds) of the delivery latency histogram.
const LATENCY_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Default)]
pub struct Metrics {
    pub connections_current: AtomicI64,
    pub connections_total: AtomicU64,
    closed: [AtomicU64; 16],
    pub received: [AtomicU64; 3],
    pub sent: [AtomicU64; 3],
    dropped: [[AtomicU64; 3]; 5],
    pub retained: AtomicU64,
    pub subscriptions: AtomicU64,
    pub sessions: AtomicU64,
    pub inflight: AtomicU64,
    pub queued: AtomicU64,
    latency_buckets: [AtomicU64; 14],
    latency_count: AtomicU64,
    latency_sum_ns: AtomicU64,
    pub store_commits: AtomicU64,
    pub store_errors: AtomicU64,
    /// Series of parts that own their counters (the cluster), appended to
    /// the node's.
    pub extra: std::sync::OnceLock<Render>,
}

/// Appends a part's series to the text being rendered.
pub type Render = Box<dyn Fn(&mut String) + Send + Sync>;

impl Metrics {
    pub fn closed(&self, r: CloseReason) {
        let i = CloseReason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.closed[i].fetch_add(1, Relaxed);
    }

    pub fn closed_count(&self, r: CloseReason) -> u64 {
        let i = CloseReason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.closed[i].load(Relaxed)
    }

    pub fn dropped(&self, r: DropReason, qos: u8) {
        let i = DropReason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.dropped[i][usize::from(qos.min(2))].fetch_add(1, Relaxed);
    }

    pub fn dropped_count(&self, r: DropReason) -> u64 {
        let i = DropReason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.dropped[i].iter().map(|a| a.load(Relaxed)).sum()
    }

    pub fn observe_latency(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| s <= *b) {
            self.latency_buckets[i].fetch_add(1, Relaxed);
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_ns.fetch_add(d.as_nanos().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    pub fn render(&self, node: &str) -> String {
        let mut o = String::with_capacity(8192);
        let n = node;
        let g = |o: &mut String, name: &str, help: &str, kind: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        g(&mut o, "broker_connections", "Connected MQTT clients.", "gauge");
        let _ = writeln!(o, "broker_connections{{node=\"{n}\"}} {}", self.connections_current.load(Relaxed));
        g(&mut o, "broker_connections_total", "Accepted MQTT connections.", "counter");
        let _ = writeln!(o, "broker_connections_total{{node=\"{n}\"}} {}", self.connections_total.load(Relaxed));
        g(&mut o, "broker_connections_closed_total", "Closed connections by reason.", "counter");
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            let _ = writeln!(
                o,
                "broker_connections_closed_total{{node=\"{n}\",reason=\"{}\"}} {}",
                r.label(),
                self.closed[i].load(Relaxed)
            );
        }
        for (name, arr, help) in [
            ("broker_messages_received_total", &self.received, "PUBLISH packets received from clients."),
            ("broker_messages_sent_total", &self.sent, "PUBLISH packets sent to clients."),
        ] {
            g(&mut o, name, help, "counter");
            for (q, a) in arr.iter().enumerate() {
                let _ = writeln!(o, "{name}{{node=\"{n}\",qos=\"{q}\"}} {}", a.load(Relaxed));
            }
        }
        g(&mut o, "broker_messages_dropped_total", "Messages not delivered, by reason.", "counter");
        for (i, r) in DropReason::ALL.iter().enumerate() {
            for q in 0..3 {
                let _ = writeln!(
                    o,
                    "broker_messages_dropped_total{{node=\"{n}\",reason=\"{}\",qos=\"{q}\"}} {}",
                    r.label(),
                    self.dropped[i][q].load(Relaxed)
                );
            }
        }
        for (name, v, help) in [
            ("broker_retained_messages", &self.retained, "Retained messages."),
            ("broker_subscriptions", &self.subscriptions, "Subscriptions."),
            ("broker_sessions", &self.sessions, "Sessions (online and offline)."),
            ("broker_inflight_messages", &self.inflight, "Outgoing QoS 1/2 messages awaiting acknowledgement."),
            ("broker_queued_messages", &self.queued, "Messages queued for sessions."),
        ] {
            g(&mut o, name, help, "gauge");
            let _ = writeln!(o, "{name}{{node=\"{n}\"}} {}", v.load(Relaxed));
        }
        g(&mut o, "broker_store_commits_total", "Durable store commits.", "counter");
        let _ = writeln!(o, "broker_store_commits_total{{node=\"{n}\"}} {}", self.store_commits.load(Relaxed));
        g(&mut o, "broker_store_errors_total", "Durable store commit failures.", "counter");
        let _ = writeln!(o, "broker_store_errors_total{{node=\"{n}\"}} {}", self.store_errors.load(Relaxed));
        let name = "broker_delivery_latency_seconds";
        g(&mut o, name, "Broker in to subscriber out.", "histogram");
        let mut cum = 0;
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            cum += self.latency_buckets[i].load(Relaxed);
            let _ = writeln!(o, "{name}_bucket{{node=\"{n}\",le=\"{b}\"}} {cum}");
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(o, "{name}_bucket{{node=\"{n}\",le=\"+Inf\"}} {count}");
        let _ = writeln!(o, "{name}_sum{{node=\"{n}\"}} {}", self.latency_sum_ns.load(Relaxed) as f64 / 1e9);
        let _ = writeln!(o, "{name}_count{{node=\"{n}\"}} {count}");
        if let Some((cpu, rss)) = process_stats() {
            g(&mut o, "process_cpu_seconds_total", "User and system CPU time.", "counter");
            let _ = writeln!(o, "process_cpu_seconds_total{{node=\"{n}\"}} {cpu}");
            g(&mut o, "process_resident_memory_bytes", "Resident set size.", "gauge");
            let _ = writeln!(o, "process_resident_memory_bytes{{node=\"{n}\"}} {rss}");
        }
        if let Some(extra) = self.extra.get() {
            extra(&mut o);
        }
        o
    }
}

/// CPU seconds and RSS bytes from /proc/self (proc(5)).
fn process_stats() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions; it only reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let rss_pages: u64 = statm.split(' ').nth(1)?.parse().ok()?;
    Some(((utime + stime) / ticks.max(1.0), rss_pages * page))
}
