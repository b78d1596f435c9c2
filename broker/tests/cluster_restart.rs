//! A cluster node stopped (SIGTERM, the graceful stop) and restarted on its
//! data directory while its publisher reconnects at once: every QoS 1/2
//! message the restarted node acknowledges reaches the subscribers on the
//! other nodes, and no QoS 2 message arrives twice. The restarted node knows
//! no remote routes until its peers send their tables again, and their links
//! to it are in reconnect backoff by then: it must not serve MQTT before.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker::client::{Client, connect_packet, publish};
use broker::codec::{Ack, Packet, QoS, Version};
use common::nodes::{ProcNode, converged};
use common::subscribe;
use tokio_util::sync::CancellationToken;

/// Message number -> times it arrived.
type Seen = Arc<Mutex<HashMap<u32, u32>>>;

/// A persistent-session QoS 2 subscriber on a node that stays up: records
/// each message number as it arrives and completes both QoS flows.
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
                let reply = match pkt {
                    Ok(Packet::Publish(m)) => {
                        if m.payload.len() == 4 {
                            let k = u32::from_be_bytes(m.payload[..4].try_into().expect("4 bytes"));
                            *s.lock().expect("seen").entry(k).or_default() += 1;
                        }
                        match m.qos {
                            QoS::AtLeastOnce => Some(Packet::PubAck(Ack::new(m.pid, 0))),
                            QoS::ExactlyOnce => Some(Packet::PubRec(Ack::new(m.pid, 0))),
                            QoS::AtMostOnce => None,
                        }
                    }
                    Ok(Packet::PubRel(a)) => Some(Packet::PubComp(Ack::new(a.pid, 0))),
                    Ok(_) => None,
                    Err(_) => break,
                };
                if let Some(r) = reply
                    && c.send(&r).await.is_err()
                {
                    break;
                }
            }
        }
    });
    (seen, task)
}

/// Publishes `n` messages numbered from `from` on `c`, odd numbers QoS 2 and even QoS 1, one at
/// a time through its whole flow; returns the numbers the broker
/// acknowledged (PUBACK, or PUBCOMP after PUBREC and PUBREL) with a
/// success code.
async fn publish_acked(c: &mut Client, topic: &str, from: u32, n: u32) -> Vec<(u32, QoS)> {
    let mut acked = Vec::new();
    for k in from..from + n {
        let qos = if k % 2 == 1 { QoS::ExactlyOnce } else { QoS::AtLeastOnce };
        let pid = (k % 60_000) as u16 + 1;
        c.send(&publish(topic, qos, pid, k.to_be_bytes().to_vec())).await.expect("publish");
        // Success codes include 0x10 "no matching subscribers": the
        // publisher is told its message is safe either way.
        match (qos, c.recv(Duration::from_secs(10)).await.expect("ack")) {
            (QoS::AtLeastOnce, Packet::PubAck(a)) if a.pid == pid && a.code < 0x80 => {}
            (QoS::ExactlyOnce, Packet::PubRec(a)) if a.pid == pid && a.code < 0x80 => {
                c.send(&Packet::PubRel(Ack::new(pid, 0))).await.expect("pubrel");
                match c.recv(Duration::from_secs(10)).await.expect("pubcomp") {
                    Packet::PubComp(a) if a.pid == pid => {}
                    other => panic!("expected PUBCOMP {pid}, got {other:?}"),
                }
            }
            (_, other) => panic!("expected the ack of {k} ({qos:?}), got {other:?}"),
        }
        acked.push((k, qos));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    acked
}

/// n2 (publisher side) is SIGTERMed, stays down 2 s (the peers' links to
/// it back off meanwhile, as in the runner's node-kill case) and restarts;
/// its persistent publisher reconnects at once and publishes. Both
/// subscribers on n3 get every acknowledged message, QoS 2 exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_acks_nothing_before_it_has_its_peers_routes() {
    const N: u32 = 400;
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = ProcNode::spawn(dir.path(), "n1", &[], &[]);
    let mut n2 = ProcNode::spawn(dir.path(), "n2", &[n1.cluster], &[]);
    let n3 = ProcNode::spawn(dir.path(), "n3", &[n1.cluster], &[]);
    converged(&[&n1, &n2, &n3], Duration::from_secs(20));
    for id in ["s3a", "s3b"] {
        let mut c = common::connect(n3.mqtt, Version::V311, id, false).await;
        subscribe(&mut c, "restart/#", QoS::ExactlyOnce).await;
    }
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let (seen_a, _ta) = subscriber(n3.mqtt, "s3a", stop.clone());
    let (seen_b, _tb) = subscriber(n3.mqtt, "s3b", stop.clone());
    converged(&[&n1, &n2, &n3], Duration::from_secs(20));
    // The route reached n2 before the stop: the publisher's session and
    // n2's peers are on its disk.
    let mut p = common::connect(n2.mqtt, Version::V5, "pub2", false).await;
    let before = publish_acked(&mut p, "restart/x", 0, 20).await;
    drop(p);

    n2.term();
    tokio::time::sleep(Duration::from_secs(2)).await;
    n2.start();
    let t0 = Instant::now();
    let (mut p, _) = tokio::time::timeout(
        Duration::from_secs(15),
        Client::connect(n2.mqtt, connect_packet(Version::V5, "pub2", false, 30)),
    )
    .await
    .expect("CONNACK from the restarted n2 within 15 s")
    .expect("connect to the restarted n2");
    eprintln!("pub2 reconnected to the restarted n2 {:?} after its start", t0.elapsed());
    let acked = publish_acked(&mut p, "restart/y", 1000, N).await;

    for (seen, who) in [(&seen_a, "s3a on n3"), (&seen_b, "s3b on n3")] {
        let t = Instant::now();
        loop {
            let got = seen.lock().expect("seen").clone();
            let missing: Vec<u32> = acked.iter().map(|(k, _)| *k).filter(|k| !got.contains_key(k)).collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{who}: {} of {N} QoS 1/2 messages the restarted n2 acknowledged never arrived (first {:?})",
                missing.len(),
                &missing[..missing.len().min(10)]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let got = seen.lock().expect("seen").clone();
        let dup2: Vec<u32> =
            acked.iter().filter(|(k, q)| *q == QoS::ExactlyOnce && got[k] > 1).map(|(k, _)| *k).collect();
        assert!(dup2.is_empty(), "{who}: QoS 2 messages delivered twice: {dup2:?}");
        eprintln!("{who}: all {N} acknowledged messages after the restart arrived, no QoS 2 twice");
    }
    assert!(before.len() == 20, "publishing before the stop");
    assert_eq!(n2.log_lines("shutting down"), 1, "n2 stopped through SIGTERM: {}", n2.log_text());
}
