//! The cluster's Prometheus series, rendered after the node's.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::Node;
use super::members::PeerState;

/// Reasons a request from a peer was refused (fixed label set).
const REJECTED: [&str; 5] = ["unknown_peer", "name_collision", "protocol", "invalid", "malformed"];

/// Upper bounds (seconds) of the forward latency histogram: a forward waits
/// for the peer's routing (and its fsync for persistent sessions), and while
/// a peer is away for as long as it is away.
const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0];

/// Why forwards were dropped, one episode counted per start of dropping.
pub const DROP_EPISODES: [&str; 2] = ["queue_full", "peer_down_too_long"];

#[derive(Default)]
pub struct ClusterMetrics {
    latency_buckets: [AtomicU64; 14],
    latency_count: AtomicU64,
    latency_sum_ns: AtomicU64,
    drop_episodes: [AtomicU64; 2],
    rejected: [AtomicU64; 5],
    pub resyncs_sent: AtomicU64,
    pub resyncs_received: AtomicU64,
    pub join_failures: AtomicU64,
    pub link_failures: AtomicU64,
    /// Forwards for a node that left the member list.
    pub no_peer: AtomicU64,
    /// Publishers that stopped waiting for a congested forward queue.
    pub backpressure_timeouts: AtomicU64,
    /// Publishers made to wait for a congested forward queue.
    pub backpressure_waits: AtomicU64,
    /// Shared-group forwards taken back from a down peer and placed again:
    /// never sent to it, or sent (it may have delivered them before it
    /// went down: the one case where a group can get a message twice).
    pub reassigned_unsent: AtomicU64,
    pub reassigned_sent: AtomicU64,
}

impl ClusterMetrics {
    pub fn rejected(&self, reason: &str) {
        let i = REJECTED.iter().position(|r| *r == reason).unwrap_or(REJECTED.len() - 1);
        self.rejected[i].fetch_add(1, Relaxed);
    }

    /// Publish received (by this node's router) to the peer's ack.
    pub fn observe_forward(&self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| s <= *b) {
            self.latency_buckets[i].fetch_add(1, Relaxed);
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_ns.fetch_add(d.as_nanos().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    pub fn drop_episode(&self, reason: &str) {
        let i = DROP_EPISODES.iter().position(|r| *r == reason).unwrap_or(0);
        self.drop_episodes[i].fetch_add(1, Relaxed);
    }

    pub fn forward_no_peer(&self) {
        self.no_peer.fetch_add(1, Relaxed);
    }
}

pub fn render(node: &Node, o: &mut String) {
    let n = &node.settings.node_name;
    let m = &node.metrics;
    let g = |o: &mut String, name: &str, help: &str, kind: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    let peers = node.members.all();
    g(o, "broker_cluster_peers", "Known peers by failure-detector state.", "gauge");
    for s in PeerState::ALL {
        let c = peers.iter().filter(|p| p.state(&node.settings) == s).count();
        let _ = writeln!(o, "broker_cluster_peers{{node=\"{n}\",state=\"{}\"}} {c}", s.label());
    }
    g(
        o,
        "broker_cluster_forwards_total",
        "Forwarded publishes per peer: sent (attempts), acked, retried, dropped.",
        "counter",
    );
    for p in &peers {
        let c = &p.queue.counters;
        for (r, v) in [("sent", &c.sent), ("acked", &c.acked), ("retried", &c.retried), ("dropped", &c.dropped)] {
            let _ = writeln!(
                o,
                "broker_cluster_forwards_total{{node=\"{n}\",peer=\"{}\",result=\"{r}\"}} {}",
                p.name,
                v.load(Relaxed)
            );
        }
    }
    let name = "broker_cluster_forward_latency_seconds";
    g(o, name, "Publish received to the peer's acknowledgement of its forward.", "histogram");
    let mut cum = 0;
    for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
        cum += m.latency_buckets[i].load(Relaxed);
        let _ = writeln!(o, "{name}_bucket{{node=\"{n}\",le=\"{b}\"}} {cum}");
    }
    let count = m.latency_count.load(Relaxed);
    let _ = writeln!(o, "{name}_bucket{{node=\"{n}\",le=\"+Inf\"}} {count}");
    let _ = writeln!(o, "{name}_sum{{node=\"{n}\"}} {}", m.latency_sum_ns.load(Relaxed) as f64 / 1e9);
    let _ = writeln!(o, "{name}_count{{node=\"{n}\"}} {count}");
    g(
        o,
        "broker_cluster_forward_drop_episodes_total",
        "Times forwards for a peer started being dropped (each logged once), by reason.",
        "counter",
    );
    for (i, r) in DROP_EPISODES.iter().enumerate() {
        let _ = writeln!(
            o,
            "broker_cluster_forward_drop_episodes_total{{node=\"{n}\",reason=\"{r}\"}} {}",
            m.drop_episodes[i].load(Relaxed)
        );
    }
    g(o, "broker_cluster_forwards_unroutable_total", "Forwards for a node no longer in the member list.", "counter");
    let _ = writeln!(o, "broker_cluster_forwards_unroutable_total{{node=\"{n}\"}} {}", m.no_peer.load(Relaxed));
    g(o, "broker_cluster_forward_queue", "Forwards waiting for a peer.", "gauge");
    for p in &peers {
        let _ = writeln!(o, "broker_cluster_forward_queue{{node=\"{n}\",peer=\"{}\"}} {}", p.name, p.queue.len());
    }
    g(o, "broker_cluster_routes", "Routes: this node's own (peer=\"\") and those held for each peer.", "gauge");
    let _ = writeln!(o, "broker_cluster_routes{{node=\"{n}\",peer=\"\"}} {}", node.routes.len());
    for p in &peers {
        let held = p.held.lock().expect("held lock").routes;
        let _ = writeln!(o, "broker_cluster_routes{{node=\"{n}\",peer=\"{}\"}} {held}", p.name);
    }
    g(o, "broker_cluster_route_version", "Version of this node's route table.", "gauge");
    let _ = writeln!(o, "broker_cluster_route_version{{node=\"{n}\"}} {}", node.routes.version());
    g(o, "broker_cluster_resyncs_total", "Full route tables sent to and received from peers.", "counter");
    let _ =
        writeln!(o, "broker_cluster_resyncs_total{{node=\"{n}\",direction=\"sent\"}} {}", m.resyncs_sent.load(Relaxed));
    let _ = writeln!(
        o,
        "broker_cluster_resyncs_total{{node=\"{n}\",direction=\"received\"}} {}",
        m.resyncs_received.load(Relaxed)
    );
    g(o, "broker_cluster_duplicates_dropped_total", "Forwarded publishes received again and dropped.", "counter");
    let _ =
        writeln!(o, "broker_cluster_duplicates_dropped_total{{node=\"{n}\"}} {}", node.dedup.duplicates.load(Relaxed));
    g(o, "broker_cluster_rejected_total", "Requests from peers refused, by reason.", "counter");
    for (i, r) in REJECTED.iter().enumerate() {
        let _ =
            writeln!(o, "broker_cluster_rejected_total{{node=\"{n}\",reason=\"{r}\"}} {}", m.rejected[i].load(Relaxed));
    }
    g(
        o,
        "broker_cluster_link_failures_total",
        "Connections to peers that failed (joins through seeds included).",
        "counter",
    );
    let failures = m.link_failures.load(Relaxed) + m.join_failures.load(Relaxed);
    let _ = writeln!(o, "broker_cluster_link_failures_total{{node=\"{n}\"}} {failures}");
    g(
        o,
        "broker_cluster_backpressure_total",
        "Publishers' reads paused for a peer's congested forward queue (waited), and pauses that hit the bound (timed_out).",
        "counter",
    );
    for (r, v) in [("waited", &m.backpressure_waits), ("timed_out", &m.backpressure_timeouts)] {
        let _ = writeln!(o, "broker_cluster_backpressure_total{{node=\"{n}\",result=\"{r}\"}} {}", v.load(Relaxed));
    }
    g(
        o,
        "broker_cluster_shared_reassigned_total",
        "Shared-group forwards taken back from a down peer and given to a member that is up; sent=\"yes\": the peer \
         had been sent them and may have delivered them too (its answer lost).",
        "counter",
    );
    for (r, v) in [("no", &m.reassigned_unsent), ("yes", &m.reassigned_sent)] {
        let _ = writeln!(o, "broker_cluster_shared_reassigned_total{{node=\"{n}\",sent=\"{r}\"}} {}", v.load(Relaxed));
    }
}
