//! The broker cluster over real gRPC between nodes and real MQTT clients over
//! TCP, all on 127.0.0.1 with ports the kernel picked (port 0). Nodes run in
//! this process so that a restart is a stop and a new start on the same
//! ports; every node is stopped by its guard, also when a test fails.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use broker::client::{Client, publish};
use broker::codec::{Ack, Packet, QoS, Version};
use broker::config::Config;
use broker::server::ServerError;
use common::{connect, http_get, metric, subscribe};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One cluster node inside the test process.
struct Node {
    name: String,
    mqtt: SocketAddr,
    http: SocketAddr,
    cluster: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), ServerError>>>,
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
async fn start(name: &str, seeds: &[SocketAddr], at: Option<(SocketAddr, SocketAddr)>) -> Node {
    start_with(name, seeds, at, None).await
}

/// `start`, with sessions kept in `data` when given.
async fn start_with(
    name: &str,
    seeds: &[SocketAddr],
    at: Option<(SocketAddr, SocketAddr)>,
    data: Option<&std::path::Path>,
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
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    let task = tokio::spawn(async move { broker::server::run_node(cfg, l, Some(h), Some(c), s).await.map(|_| ()) });
    Node { name: name.into(), mqtt, http, cluster, shutdown, task: Some(task) }
}

impl Node {
    /// Stops the node and waits until it has let go of its ports.
    async fn stop(mut self) -> (SocketAddr, SocketAddr) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let r = tokio::time::timeout(Duration::from_secs(10), t).await.expect("node stops within 10 s");
            r.expect("join").expect("node ran cleanly");
        }
        (self.mqtt, self.cluster)
    }

    fn metrics(&self) -> String {
        http_get(self.http, "/metrics").1
    }
}

/// Waits until every node sees `peers` peers up.
async fn converged(nodes: &[&Node], peers: usize) {
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
async fn until_routed(via: SocketAddr, subs: &mut [&mut Client], topic: &str) -> Duration {
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
async fn receive_all(mut c: Client, topic: &'static str, n: u32) -> (HashSet<u32>, u32) {
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
async fn publish_all(c: &mut Client, topic: &str, n: u32) {
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
async fn publish_all_qos2(c: &mut Client, topic: &str, n: u32) {
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

/// 1,000 QoS 2 messages published on node 2 reach the QoS 2 subscribers on
/// nodes 1 and 3 exactly once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_qos2_exactly_once() {
    const N: u32 = 1000;
    let n1 = start("n1", &[], None).await;
    let n2 = start("n2", &[n1.cluster], None).await;
    let n3 = start("n3", &[n1.cluster], None).await;
    converged(&[&n1, &n2, &n3], 2).await;
    let mut s1 = connect(n1.mqtt, Version::V5, "sub1", true).await;
    let mut s3 = connect(n3.mqtt, Version::V311, "sub3", true).await;
    assert_eq!(subscribe(&mut s1, "two/#", QoS::ExactlyOnce).await, vec![2]);
    assert_eq!(subscribe(&mut s3, "two/#", QoS::ExactlyOnce).await, vec![2]);
    until_routed(n2.mqtt, &mut [&mut s1, &mut s3], "two/probe").await;
    let r1 = tokio::spawn(receive_all(s1, "two/x", N));
    let r3 = tokio::spawn(receive_all(s3, "two/x", N));
    let mut p = connect(n2.mqtt, Version::V5, "pub2", true).await;
    publish_all_qos2(&mut p, "two/x", N).await;
    let ((seen1, d1), (seen3, d3)) = (r1.await.expect("join"), r3.await.expect("join"));
    eprintln!("{N} QoS 2 on n2: n1's subscriber got {} (+{d1} duplicates), n3's {} (+{d3})", seen1.len(), seen3.len());
    assert_eq!((seen1.len() as u32, d1), (N, 0), "subscriber on node 1");
    assert_eq!((seen3.len() as u32, d3), (N, 0), "subscriber on node 3");
    for n in [n1, n2, n3] {
        n.stop().await;
    }
}

/// Subscribers on nodes 1 and 3, a publisher on node 2: every subscriber gets
/// each of 10,000 QoS 1 messages, each node once per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_every_qos1_message() {
    const N: u32 = 10_000;
    let n1 = start("n1", &[], None).await;
    let n2 = start("n2", &[n1.cluster], None).await;
    let n3 = start("n3", &[n1.cluster, n2.cluster], None).await;
    converged(&[&n1, &n2, &n3], 2).await;
    let mut s1 = connect(n1.mqtt, Version::V5, "sub1", true).await;
    let mut s3 = connect(n3.mqtt, Version::V311, "sub3", true).await;
    assert_eq!(subscribe(&mut s1, "load/#", QoS::AtLeastOnce).await, vec![1]);
    assert_eq!(subscribe(&mut s3, "load/+", QoS::AtLeastOnce).await, vec![1]);
    let took = until_routed(n2.mqtt, &mut [&mut s1, &mut s3], "load/probe").await;
    eprintln!("routes of nodes 1 and 3 visible on node 2 after {took:?}");
    let r1 = tokio::spawn(receive_all(s1, "load/x", N));
    let r3 = tokio::spawn(receive_all(s3, "load/x", N));
    let mut p = connect(n2.mqtt, Version::V5, "pub2", true).await;
    let t0 = Instant::now();
    publish_all(&mut p, "load/x", N).await;
    let ((seen1, d1), (seen3, d3)) = (r1.await.expect("join"), r3.await.expect("join"));
    eprintln!(
        "{N} QoS 1 messages published on n2 in {:?}: n1's subscriber got {} (+{d1} duplicates), n3's {} (+{d3})",
        t0.elapsed(),
        seen1.len(),
        seen3.len()
    );
    assert_eq!(seen1.len() as u32, N, "subscriber on node 1 missed messages");
    assert_eq!(seen3.len() as u32, N, "subscriber on node 3 missed messages");
    // Once per node, not once per subscriber: the ack counter of each peer
    // holds the probes and the N messages.
    let m2 = n2.metrics();
    for peer in ["n1", "n3"] {
        let acked =
            metric(&m2, &format!("broker_cluster_forwards_total{{node=\"n2\",peer=\"{peer}\",result=\"acked\"}}"));
        assert!(acked >= f64::from(N), "forwards acked by {peer}: {acked}");
        let dropped =
            metric(&m2, &format!("broker_cluster_forwards_total{{node=\"n2\",peer=\"{peer}\",result=\"dropped\"}}"));
        assert_eq!(dropped, 0.0, "forwards to {peer} dropped");
    }
    for n in [n1, n2, n3] {
        n.stop().await;
    }
}

/// A second node named like a live member is refused with a clear error,
/// and the cluster keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_name_collision_is_refused() {
    let n1 = start("n1", &[], None).await;
    let n2 = start("n2", &[n1.cluster], None).await;
    converged(&[&n1, &n2], 1).await;
    let mut dup = start("n2", &[n1.cluster], None).await;
    let r = tokio::time::timeout(Duration::from_secs(10), dup.task.take().expect("task"))
        .await
        .expect("the newcomer stops within 10 s")
        .expect("join");
    let e = r.expect_err("a second n2 was let in").to_string();
    eprintln!("newcomer refused: {e}");
    assert!(e.contains("node name \"n2\" is already taken"), "{e}");
    let refused = metric(&n1.metrics(), "broker_cluster_rejected_total{node=\"n1\",reason=\"name_collision\"}");
    assert_eq!(refused, 1.0);
    // The real n2 is still a member, and n1 still serves.
    converged(&[&n1, &n2], 1).await;
    let mut s = connect(n1.mqtt, Version::V5, "s", true).await;
    subscribe(&mut s, "after/collision", QoS::AtLeastOnce).await;
    let took = until_routed(n2.mqtt, &mut [&mut s], "after/collision").await;
    eprintln!("routes after the refusal: {took:?}");
    for n in [n1, n2] {
        n.stop().await;
    }
}

/// Node 3 stops and starts again on the same ports (a new incarnation with
/// no state): it rejoins, node 2 drops the routes of its previous run and
/// learns the new ones, and messages flow again both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_rejoins_and_routes_reconverge() {
    let n1 = start("n1", &[], None).await;
    let n2 = start("n2", &[n1.cluster], None).await;
    let n3 = start("n3", &[n1.cluster], None).await;
    converged(&[&n1, &n2, &n3], 2).await;
    let mut s3 = connect(n3.mqtt, Version::V5, "sub3", true).await;
    subscribe(&mut s3, "old/route", QoS::AtLeastOnce).await;
    until_routed(n2.mqtt, &mut [&mut s3], "old/route").await;
    drop(s3);
    let at = n3.stop().await;
    // n2 sees n3 go down.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&n2.metrics(), "broker_cluster_peers{node=\"n2\",state=\"down\"}") < 1.0 {
        assert!(Instant::now() < deadline, "n2 never saw n3 down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t0 = Instant::now();
    let n3 = start("n3", &[n1.cluster], Some(at)).await;
    converged(&[&n1, &n2, &n3], 2).await;
    eprintln!("n3 back up on every node {:?} after its restart", t0.elapsed());
    // The old run's route is gone from n2 (the new n3 has no subscription).
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&n2.metrics(), "broker_cluster_routes{node=\"n2\",peer=\"n3\"}") != 0.0 {
        assert!(Instant::now() < deadline, "n2 still holds the routes of n3's previous run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut s3 = connect(n3.mqtt, Version::V5, "sub3b", true).await;
    let mut s1 = connect(n1.mqtt, Version::V5, "sub1", true).await;
    subscribe(&mut s3, "new/#", QoS::AtLeastOnce).await;
    subscribe(&mut s1, "new/#", QoS::AtLeastOnce).await;
    let took = until_routed(n2.mqtt, &mut [&mut s1, &mut s3], "new/route").await;
    eprintln!("routes reconverged {took:?} after subscribing on the restarted node");
    let r1 = tokio::spawn(receive_all(s1, "new/x", 1000));
    let r3 = tokio::spawn(receive_all(s3, "new/x", 1000));
    let mut p = connect(n2.mqtt, Version::V5, "pub2", true).await;
    publish_all(&mut p, "new/x", 1000).await;
    let (seen1, seen3) = (r1.await.expect("join").0, r3.await.expect("join").0);
    assert_eq!((seen1.len(), seen3.len()), (1000, 1000), "messages after the restart");
    for n in [n1, n2, n3] {
        n.stop().await;
    }
}

/// QoS 1 messages acknowledged on node 2 while node 3 is stopped wait in
/// node 2's forward queue for it, and reach node 3's persistent session once
/// node 3 is back (restored from its data directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_queued_for_a_stopped_node_are_delivered_after_it_returns() {
    const N: u32 = 1000;
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = start("n1", &[], None).await;
    let n2 = start("n2", &[n1.cluster], None).await;
    let n3 = start_with("n3", &[n1.cluster], None, Some(dir.path())).await;
    converged(&[&n1, &n2, &n3], 2).await;
    let mut s3 = connect(n3.mqtt, Version::V311, "persistent3", false).await;
    subscribe(&mut s3, "q/#", QoS::AtLeastOnce).await;
    until_routed(n2.mqtt, &mut [&mut s3], "q/probe").await;
    drop(s3);
    let at = n3.stop().await;
    let mut p = connect(n2.mqtt, Version::V5, "pub2", true).await;
    publish_all(&mut p, "q/x", N).await;
    let queued = metric(&n2.metrics(), "broker_cluster_forward_queue{node=\"n2\",peer=\"n3\"}");
    eprintln!("{N} QoS 1 acknowledged on n2 while n3 was stopped; {queued} queued for n3");
    assert!(queued >= f64::from(N), "forwards for the stopped node were not queued: {queued}");
    // The stopped node's store thread lets go of its database file just
    // after the node stopped.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = broker::store::Store::open(dir.path()) {
        assert!(Instant::now() < deadline, "the stopped node's store stays open: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t0 = Instant::now();
    let n3 = start_with("n3", &[n1.cluster], Some(at), Some(dir.path())).await;
    let s3 = connect(n3.mqtt, Version::V311, "persistent3", false).await;
    let (seen, dups) = receive_all(s3, "q/x", N).await;
    eprintln!(
        "after the restart n3's persistent session got {} of {N} (+{dups} duplicates) in {:?}",
        seen.len(),
        t0.elapsed()
    );
    assert_eq!(seen.len() as u32, N, "messages queued for the stopped node were lost");
    for n in [n1, n2, n3] {
        n.stop().await;
    }
}
