//! Cluster nodes inside the test process, on 127.0.0.1 with ports the
//! kernel picked (port 0), and what the cluster tests do with them over real
//! MQTT. A restart is a stop and a new start on the same ports; every node is
//! stopped by its guard, also when a test fails.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use broker::client::{Client, publish};
use broker::codec::{Ack, Packet, QoS, Version};
use broker::config::Config;
use broker::server::ServerError;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{connect, http_get, metric};

/// One cluster node inside the test process.
pub struct Node {
    pub name: String,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    pub cluster: SocketAddr,
    shutdown: CancellationToken,
    pub task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn bind(addr: Option<SocketAddr>) -> TcpListener {
    let a = addr.unwrap_or_else(|| "127.0.0.1:0".parse().expect("addr"));
    // A restarted node binds its ports again; the previous run's sockets
    // may take a moment to go.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(a).await {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                eprintln!("binding {a}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("binding {a}: {e}"),
        }
    }
}

/// Starts node `name` joining `seeds`; `at` reuses the ports of a previous
/// run (mqtt, cluster).
pub async fn start(name: &str, seeds: &[SocketAddr], at: Option<(SocketAddr, SocketAddr)>) -> Node {
    start_with(name, seeds, at, None).await
}

/// `start`, with sessions kept in `data` when given.
pub async fn start_with(
    name: &str,
    seeds: &[SocketAddr],
    at: Option<(SocketAddr, SocketAddr)>,
    data: Option<&std::path::Path>,
) -> Node {
    start_cfg(name, seeds, at, data, |_| ()).await
}

/// `start_with`, with `tweak` applied to the node's configuration.
pub async fn start_cfg(
    name: &str,
    seeds: &[SocketAddr],
    at: Option<(SocketAddr, SocketAddr)>,
    data: Option<&std::path::Path>,
    tweak: impl FnOnce(&mut Config),
) -> Node {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let l = bind(at.map(|a| a.0)).await;
    let h = bind(None).await;
    let c = bind(at.map(|a| a.1)).await;
    let (mqtt, http, cluster) =
        (l.local_addr().expect("addr"), h.local_addr().expect("addr"), c.local_addr().expect("addr"));
    let cfg = Config {
        node_name: name.into(),
        sys_interval_secs: 0,
        cluster_listen: Some(cluster.to_string()),
        join: seeds.iter().map(|s| s.to_string()).collect(),
        cluster_heartbeat_ms: 100,
        cluster_suspect_after_ms: 400,
        cluster_down_after_ms: 1500,
        data_dir: data.map(|d| d.to_owned()),
        ..Config::default()
    };
    let mut cfg = cfg;
    tweak(&mut cfg);
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    let task = tokio::spawn(async move { broker::server::run_node(cfg, l, Some(h), Some(c), s).await.map(|_| ()) });
    Node { name: name.into(), mqtt, http, cluster, shutdown, task: Some(task) }
}

impl Node {
    /// Stops the node and waits until it has let go of its ports.
    pub async fn stop(mut self) -> (SocketAddr, SocketAddr) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let r = tokio::time::timeout(Duration::from_secs(10), t).await.expect("node stops within 10 s");
            r.expect("join").expect("node ran cleanly");
        }
        (self.mqtt, self.cluster)
    }

    pub fn metrics(&self) -> String {
        http_get(self.http, "/metrics").1
    }
}

/// Waits until every node sees `peers` peers up.
pub async fn converged(nodes: &[&Node], peers: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ups: Vec<f64> = nodes
            .iter()
            .map(|n| metric(&n.metrics(), &format!("broker_cluster_peers{{node=\"{}\",state=\"up\"}}", n.name)))
            .collect();
        if ups.iter().all(|u| *u as usize == peers) {
            return;
        }
        assert!(Instant::now() < deadline, "cluster did not converge: peers up per node {ups:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes QoS 0 probes on `via` until every subscriber got one: the
/// subscribers' routes have reached the publisher's node. Returns how long
/// it took.
pub async fn until_routed(via: SocketAddr, subs: &mut [&mut Client], topic: &str) -> Duration {
    let t0 = Instant::now();
    let mut p = connect(via, Version::V5, "prober", true).await;
    let mut got = vec![false; subs.len()];
    while got.iter().any(|g| !g) {
        assert!(t0.elapsed() < Duration::from_secs(20), "routes did not reach {via}: probes received {got:?}");
        p.send(&publish(topic, QoS::AtMostOnce, 0, &b"probe"[..])).await.expect("probe");
        for (i, s) in subs.iter_mut().enumerate() {
            while let Ok(pkt) = s.recv(Duration::from_millis(50)).await {
                if let Packet::Publish(m) = pkt
                    && m.topic == topic
                {
                    got[i] = true;
                }
            }
        }
    }
    // Probes still on their way are read and ignored by the receivers.
    t0.elapsed()
}

/// Receives QoS 1 or 2 messages numbered 0..n on `client` (acknowledging each)
/// until every number arrived; returns how many duplicates came along.
pub async fn receive_all(mut c: Client, topic: &'static str, n: u32) -> (HashSet<u32>, u32) {
    let mut seen = HashSet::new();
    let mut dups = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (seen.len() as u32) < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let pkt = match c.recv(left.min(Duration::from_secs(10))).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("receiver stopped after {} of {n}: {e}", seen.len());
                return (seen, dups);
            }
        };
        if let Packet::PubRel(a) = &pkt {
            c.send(&Packet::PubComp(Ack::new(a.pid, 0))).await.expect("pubcomp");
            continue;
        }
        if let Packet::Publish(m) = pkt {
            match m.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => c.send(&Packet::PubAck(Ack::new(m.pid, 0))).await.expect("puback"),
                QoS::ExactlyOnce => c.send(&Packet::PubRec(Ack::new(m.pid, 0))).await.expect("pubrec"),
            }
            if m.topic != topic {
                continue;
            }
            let i = u32::from_be_bytes(m.payload[..4].try_into().expect("4-byte payload"));
            if !seen.insert(i) {
                dups += 1;
            }
        }
    }
    (seen, dups)
}

/// Publishes QoS 1 messages numbered 0..n in windows of 500, each window
/// acknowledged before the next (the broker's receive maximum is 1024).
pub async fn publish_all(c: &mut Client, topic: &str, n: u32) {
    let mut i = 0;
    while i < n {
        let end = (i + 500).min(n);
        for k in i..end {
            let pid = (k % 65_000) as u16 + 1;
            c.wr.queue(&publish(topic, QoS::AtLeastOnce, pid, k.to_be_bytes().to_vec()));
        }
        c.wr.flush().await.expect("publish");
        let mut acked = 0;
        while acked < end - i {
            match c.recv(Duration::from_secs(10)).await.expect("puback") {
                Packet::PubAck(a) => {
                    assert!(a.code == 0, "puback {a:?}");
                    acked += 1;
                }
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
        i = end;
    }
}

/// Publishes QoS 2 messages numbered 0..n in windows of 500: PUBLISH,
/// PUBREC, PUBREL, PUBCOMP for the whole window before the next.
pub async fn publish_all_qos2(c: &mut Client, topic: &str, n: u32) {
    let mut i = 0;
    while i < n {
        let end = (i + 500).min(n);
        for k in i..end {
            let pid = (k % 65_000) as u16 + 1;
            c.wr.queue(&publish(topic, QoS::ExactlyOnce, pid, k.to_be_bytes().to_vec()));
        }
        c.wr.flush().await.expect("publish");
        for _ in i..end {
            match c.recv(Duration::from_secs(10)).await.expect("pubrec") {
                Packet::PubRec(a) => {
                    assert!(a.code == 0, "pubrec {a:?}");
                    c.wr.queue(&Packet::PubRel(Ack::new(a.pid, 0)));
                }
                other => panic!("expected PUBREC, got {other:?}"),
            }
        }
        c.wr.flush().await.expect("pubrel");
        for _ in i..end {
            match c.recv(Duration::from_secs(10)).await.expect("pubcomp") {
                Packet::PubComp(a) => assert!(a.code == 0, "pubcomp {a:?}"),
                other => panic!("expected PUBCOMP, got {other:?}"),
            }
        }
        i = end;
    }
}
