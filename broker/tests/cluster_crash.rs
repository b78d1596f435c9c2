//! Killed cluster nodes (SIGKILL, real `broker` processes on loopback,
//! restarted on the same ports and data directory) lose no QoS 1 message
//! that a broker acknowledged: the subscribing side's persistent sessions and
//! the forwards queued for it, and the publishing side's forwards on disk.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker::client::{Client, connect_packet, publish};
use broker::codec::{Ack, Packet, QoS, Version};
use common::nodes::{ProcNode, converged, until};
use common::{connect, subscribe};
use tokio_util::sync::CancellationToken;

type Seen = Arc<Mutex<HashSet<u32>>>;

/// A persistent-session subscriber that reconnects whenever its node goes
/// away, acknowledging and recording every message number it gets.
fn subscriber(addr: SocketAddr, id: &'static str, stop: CancellationToken) -> (Seen, tokio::task::JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let task = tokio::spawn(async move {
        while !stop.is_cancelled() {
            let Ok(Ok((mut c, _))) = tokio::time::timeout(
                Duration::from_secs(2),
                Client::connect(addr, connect_packet(Version::V311, id, false, 30)),
            )
            .await
            else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            loop {
                let pkt = tokio::select! {
                    p = c.recv(Duration::from_secs(30)) => p,
                    _ = stop.cancelled() => return,
                };
                let Ok(Packet::Publish(m)) = pkt else {
                    if pkt.is_err() {
                        break;
                    }
                    continue;
                };
                if m.qos == QoS::AtLeastOnce && c.send(&Packet::PubAck(Ack::new(m.pid, 0))).await.is_err() {
                    break;
                }
                if m.payload.len() == 4 {
                    s.lock().expect("seen").insert(u32::from_be_bytes(m.payload[..4].try_into().expect("4 bytes")));
                }
            }
        }
    });
    (seen, task)
}

/// Publishes QoS 1 messages `from..to` on `c` at a steady pace (windows of
/// `window`), recording each number whose PUBACK came; stops at the first
/// connection error (its node was killed) and returns the acked numbers.
async fn publish_steady(c: &mut Client, topic: &str, from: u32, to: u32, window: u32, pause: Duration) -> HashSet<u32> {
    let mut acked = HashSet::new();
    let mut i = from;
    while i < to {
        let end = (i + window).min(to);
        for k in i..end {
            c.wr.queue(&publish(topic, QoS::AtLeastOnce, (k % 60_000) as u16 + 1, k.to_be_bytes().to_vec()));
        }
        if c.wr.flush().await.is_err() {
            return acked;
        }
        for _ in i..end {
            match c.recv(Duration::from_secs(10)).await {
                Ok(Packet::PubAck(a)) => {
                    assert_eq!(a.code, 0, "puback {a:?}");
                    acked.insert(u32::from(a.pid) - 1 + (i / 60_000) * 60_000);
                }
                Ok(other) => panic!("expected PUBACK, got {other:?}"),
                Err(_) => return acked,
            }
        }
        i = end;
        tokio::time::sleep(pause).await;
    }
    acked
}

/// Waits until `seen` holds every number in `acked`; fails naming how many
/// are missing.
async fn delivered(seen: &Seen, acked: &HashSet<u32>, who: &str, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let missing = acked.iter().filter(|k| !seen.lock().expect("seen").contains(k)).count();
        if missing == 0 {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "{who}: {missing} of {} acknowledged QoS 1 messages never arrived within {within:?}",
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes QoS 0 probes on `via` until the route of `topic` reaches it
/// (a subscriber on another node receives one).
async fn routed(via: SocketAddr, seen: &Seen, topic: &str) {
    let mut p = connect(via, Version::V5, "prober", true).await;
    let probe = u32::MAX;
    let t0 = Instant::now();
    while !seen.lock().expect("seen").contains(&probe) {
        assert!(t0.elapsed() < Duration::from_secs(20), "the route of {topic} never reached {via}");
        p.send(&publish(topic, QoS::AtMostOnce, 0, probe.to_be_bytes().to_vec())).await.expect("probe");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// QoS 1 published steadily on n2 for persistent sessions on n3; n3 is
/// SIGKILLed mid-stream and restarted on its data directory. Every message
/// n2 acknowledged reaches both sessions: what n3 had stored for them, and
/// what n2 queued for n3 while it was away. A subscriber on n1 is served
/// throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_node_killed_mid_stream_loses_no_acked_qos1() {
    const N: u32 = 3000;
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = ProcNode::spawn(dir.path(), "n1", &[], &[]);
    let n2 = ProcNode::spawn(dir.path(), "n2", &[n1.cluster], &[]);
    let mut n3 = ProcNode::spawn(dir.path(), "n3", &[n1.cluster], &[]);
    converged(&[&n1, &n2, &n3], Duration::from_secs(20));
    for id in ["p3a", "p3b"] {
        let mut c = connect(n3.mqtt, Version::V311, id, false).await;
        subscribe(&mut c, "crash/#", QoS::AtLeastOnce).await;
    }
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let (seen_a, _ta) = subscriber(n3.mqtt, "p3a", stop.clone());
    let (seen_b, _tb) = subscriber(n3.mqtt, "p3b", stop.clone());
    {
        let mut c = connect(n1.mqtt, Version::V311, "p1", false).await;
        subscribe(&mut c, "crash/#", QoS::AtLeastOnce).await;
    }
    let (seen_1, _t1) = subscriber(n1.mqtt, "p1", stop.clone());
    routed(n2.mqtt, &seen_a, "crash/probe").await;
    routed(n2.mqtt, &seen_1, "crash/probe").await;

    let mut p = connect(n2.mqtt, Version::V5, "pub2", true).await;
    let pause = Duration::from_millis(5);
    let mut acked = publish_steady(&mut p, "crash/x", 0, N / 3, 50, pause).await;
    n3.kill9();
    let killed = Instant::now();
    acked.extend(publish_steady(&mut p, "crash/x", N / 3, 2 * N / 3, 50, pause).await);
    let queued = n2.member("n3").expect("n3 in n2's members")["forward_queue"].as_u64().unwrap_or(0);
    eprintln!("n3 killed; n2 acknowledged {} so far, {queued} forwards queued for n3", acked.len());
    assert!(queued > 0, "nothing queued on n2 for the killed node");
    n3.start();
    eprintln!("n3 restarted {:?} after the kill", killed.elapsed());
    acked.extend(publish_steady(&mut p, "crash/x", 2 * N / 3, N, 50, pause).await);
    assert_eq!(acked.len() as u32, N, "n2 stopped acknowledging while n3 was away");
    for (seen, who) in [(&seen_a, "p3a on n3"), (&seen_b, "p3b on n3"), (&seen_1, "p1 on n1")] {
        let t = delivered(seen, &acked, who, Duration::from_secs(30)).await;
        eprintln!("{who}: all {N} acknowledged messages delivered ({t:?} after the last publish)");
    }
    until(Duration::from_secs(10), "n2's queue for n3 never drained", || {
        n2.member("n3").is_some_and(|m| m["forward_queue"] == 0 && m["state"] == "up")
    });
}

/// n2 acknowledges QoS 1 messages for a persistent session on n3 while n3
/// is down, so they wait in n2's forward queue; then n2 is SIGKILLed. After
/// both restart, every acknowledged message reaches the session on n3:
/// n2 kept the forwards on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_node_killed_after_pubacks_delivers_its_forwards() {
    const N: u32 = 1000;
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = ProcNode::spawn(dir.path(), "n1", &[], &[]);
    let mut n2 = ProcNode::spawn(dir.path(), "n2", &[n1.cluster], &[]);
    let mut n3 = ProcNode::spawn(dir.path(), "n3", &[n1.cluster], &[]);
    converged(&[&n1, &n2, &n3], Duration::from_secs(20));
    {
        let mut c = connect(n3.mqtt, Version::V311, "p3", false).await;
        subscribe(&mut c, "keep/#", QoS::AtLeastOnce).await;
    }
    converged(&[&n1, &n2, &n3], Duration::from_secs(20));
    n3.kill9();
    let mut p = connect(n2.mqtt, Version::V5, "pub2", true).await;
    let acked = publish_steady(&mut p, "keep/x", 0, N, 100, Duration::ZERO).await;
    assert_eq!(acked.len() as u32, N);
    let queued = n2.member("n3").expect("n3 in n2's members")["forward_queue"].as_u64().unwrap_or(0);
    assert_eq!(queued, u64::from(N), "forwards queued on n2 for the stopped n3");
    n2.kill9();
    n2.start();
    let restored = n2.member("n3").expect("n3 known to the restarted n2 from its store");
    assert_eq!(restored["forward_queue"], u64::from(N), "forwards restored from n2's disk: {restored}");
    assert_eq!(n2.log_lines("forwards restored from the store"), 1, "{}", n2.log_text());
    n3.start();
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let (seen, _t) = subscriber(n3.mqtt, "p3", stop.clone());
    let t = delivered(&seen, &acked, "p3 on n3", Duration::from_secs(30)).await;
    eprintln!("all {N} forwards n2 acknowledged before its SIGKILL delivered {t:?} after both restarted");
    until(Duration::from_secs(10), "n2's restored queue for n3 never drained", || {
        n2.member("n3").is_some_and(|m| m["forward_queue"] == 0)
    });
    // Nothing was delivered twice through the cluster (n3 acked each once).
    let dups = common::metric(&n3.metrics(), "broker_cluster_duplicates_dropped_total{node=\"n3\"}");
    eprintln!("duplicates dropped on n3: {dups}");
}

/// A peer speaking the Cluster API directly (a raw tonic client): it joins
/// `node` as "origin" of incarnation 777 (at port `at`, where nobody
/// listens) and forwards QoS 2 messages numbered `ids` on `topic`. Returns
/// (accepted, duplicates).
async fn origin_forwards(node: &ProcNode, at: u16, topic: &str, ids: std::ops::Range<u64>) -> (u32, u32) {
    use chaos_proto::broker::v1 as pb;
    let mut c = pb::cluster_client::ClusterClient::connect(format!("http://{}", node.cluster)).await.expect("connect");
    let me = pb::Node {
        name: "origin".into(),
        // Nobody listens there: the node's link to us just fails.
        cluster_addr: format!("127.0.0.1:{at}"),
        mqtt_addr: String::new(),
        incarnation: 777,
        protocol: broker::cluster::PROTOCOL,
    };
    c.join(pb::JoinRequest { node: Some(me) }).await.expect("join");
    let messages = ids
        .map(|id| pb::Forwarded {
            message_id: id,
            publish: Some(pb::Publish {
                topic: topic.into(),
                payload: (id as u32).to_be_bytes().to_vec(),
                qos: 2,
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let r = c
        .forward(pb::ForwardRequest { from: "origin".into(), incarnation: 777, messages, seq: 0 })
        .await
        .expect("forward")
        .into_inner();
    (r.accepted, r.duplicates)
}

/// A forward whose answer was lost is sent again after the receiver was
/// SIGKILLed and restarted: the receiver's deduplication marks were on disk
/// with the messages, so the retry is recognised and the persistent QoS 2
/// session gets each message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_forward_retried_across_a_receiver_restart_is_not_duplicated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut n3 = ProcNode::spawn(dir.path(), "n3", &[], &[]);
    {
        let mut c = connect(n3.mqtt, Version::V311, "q2", false).await;
        subscribe(&mut c, "dd/#", QoS::ExactlyOnce).await;
    }
    let at = common::free_port();
    assert_eq!(origin_forwards(&n3, at, "dd/x", 1..11).await, (10, 0));
    n3.kill9();
    n3.start();
    // The same batch again (its answer "was lost"), then five new ones.
    assert_eq!(origin_forwards(&n3, at, "dd/x", 1..11).await, (0, 10), "the retry after the restart");
    assert_eq!(origin_forwards(&n3, at, "dd/x", 1..16).await, (5, 10));
    let dups = common::metric(&n3.metrics(), "broker_cluster_duplicates_dropped_total{node=\"n3\"}");
    assert_eq!(dups, 20.0);
    let (mut c, _) = Client::connect(n3.mqtt, connect_packet(Version::V311, "q2", false, 30)).await.expect("reconnect");
    let mut got = Vec::new();
    while let Ok(p) = c.recv(Duration::from_secs(1)).await {
        match p {
            Packet::Publish(m) => {
                assert_eq!(m.qos, QoS::ExactlyOnce);
                c.send(&Packet::PubRec(Ack::new(m.pid, 0))).await.expect("pubrec");
                got.push(u32::from_be_bytes(m.payload[..4].try_into().expect("4 bytes")));
            }
            Packet::PubRel(a) => c.send(&Packet::PubComp(Ack::new(a.pid, 0))).await.expect("pubcomp"),
            _ => {}
        }
    }
    got.sort_unstable();
    assert_eq!(got, (1..16).collect::<Vec<u32>>(), "each forwarded QoS 2 message exactly once");
}
