//! Shared subscriptions and retained messages across cluster nodes, over
//! real gRPC between in-process nodes and real MQTT clients over TCP.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use broker::client::{Client, publish};
use broker::codec::{Ack, Packet, QoS, Version};
use common::cluster::{Node, converged, start, until_routed};
use common::{connect, metric, subscribe};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A subscriber acknowledging everything and reporting the numbers of the
/// messages on `topic` it got, until `stop`.
fn member(mut c: Client, topic: &'static str, id: usize, got: mpsc::UnboundedSender<(usize, u32)>) -> Receiver {
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        loop {
            let pkt = tokio::select! {
                p = c.recv(Duration::from_secs(60)) => p,
                _ = s.cancelled() => return,
            };
            let Ok(pkt) = pkt else { return };
            if let Packet::Publish(m) = pkt {
                if m.qos == QoS::AtLeastOnce {
                    c.send(&Packet::PubAck(Ack::new(m.pid, 0))).await.expect("puback");
                }
                if m.topic == topic {
                    let _ = got.send((id, u32::from_be_bytes(m.payload[..4].try_into().expect("4 bytes"))));
                }
            }
        }
    });
    Receiver { stop, task }
}

struct Receiver {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

/// Collects until the numbers `from..to` all arrived, then 300 ms more for
/// duplicates. Returns per member how many it got, and the duplicates.
async fn tally(rx: &mut mpsc::UnboundedReceiver<(usize, u32)>, from: u32, to: u32) -> (HashMap<usize, u32>, u32) {
    let mut seen = std::collections::HashSet::new();
    let (mut per, mut dups) = (HashMap::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut quiet_until = None;
    loop {
        let wait = match quiet_until {
            Some(t) => t,
            None if seen.len() as u32 == to - from => {
                let t = Instant::now() + Duration::from_millis(300);
                quiet_until = Some(t);
                t
            }
            None => deadline,
        };
        let left = wait.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((who, n))) => {
                assert!((from..to).contains(&n), "message {n} outside this round {from}..{to}");
                *per.entry(who).or_insert(0) += 1;
                if !seen.insert(n) {
                    dups += 1;
                }
            }
            Ok(None) => panic!("members stopped"),
            Err(_) if quiet_until.is_some() => return (per, dups),
            Err(_) => panic!("only {} of messages {from}..{to} arrived within 30 s: {per:?}", seen.len()),
        }
    }
}

async fn publish_range(c: &mut Client, topic: &str, from: u32, to: u32) {
    for k in from..to {
        c.send(&publish(topic, QoS::AtLeastOnce, (k % 65_000) as u16 + 1, k.to_be_bytes().to_vec()))
            .await
            .expect("publish");
        match c.recv(Duration::from_secs(10)).await.expect("puback") {
            Packet::PubAck(a) => assert!(a.code == 0, "puback {a:?}"),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
}

async fn until_down(n: &Node, peers: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let series = format!("broker_cluster_peers{{node=\"{}\",state=\"down\"}}", n.name);
    while (metric(&n.metrics(), &series) as usize) < peers {
        assert!(Instant::now() < deadline, "{} never saw a peer down", n.name);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A shared group with a member on node 1 (MQTT 5) and one on node 2
/// (3.1.1), a plain subscriber on node 2 beside it, publishers on nodes 3
/// and 1: each message goes to exactly one member. With node 2 stopped, the
/// member on node 1 gets every message; once node 2 is back and its member
/// subscribed again, both get messages again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_group_across_nodes_gets_each_message_once() {
    const N: u32 = 600;
    let n1 = start("n1", &[], None).await;
    let n2 = start("n2", &[n1.cluster], None).await;
    let n3 = start("n3", &[n1.cluster], None).await;
    converged(&[&n1, &n2, &n3], 2).await;
    let mut m1 = connect(n1.mqtt, Version::V5, "m1", true).await;
    let mut m2 = connect(n2.mqtt, Version::V311, "m2", true).await;
    let mut plain = connect(n2.mqtt, Version::V5, "plain", true).await;
    assert_eq!(subscribe(&mut m1, "$share/g/work/#", QoS::AtLeastOnce).await, vec![1]);
    assert_eq!(subscribe(&mut m2, "$share/g/work/#", QoS::AtLeastOnce).await, vec![1]);
    assert_eq!(subscribe(&mut plain, "work/#", QoS::AtLeastOnce).await, vec![1]);
    until_routed(n3.mqtt, &mut [&mut m1, &mut m2, &mut plain], "work/probe").await;
    until_routed(n1.mqtt, &mut [&mut m1, &mut m2], "work/probe").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (ptx, mut prx) = mpsc::unbounded_channel();
    let _r1 = member(m1, "work/x", 1, tx.clone());
    let r2 = member(m2, "work/x", 2, tx.clone());
    let _rp = member(plain, "work/x", 0, ptx);

    // Round 1: published on n3 (no member there) and on n1 (one member there).
    let mut p3 = connect(n3.mqtt, Version::V5, "pub3", true).await;
    let mut p1 = connect(n1.mqtt, Version::V5, "pub1", true).await;
    publish_range(&mut p3, "work/x", 0, N / 2).await;
    publish_range(&mut p1, "work/x", N / 2, N).await;
    let (per, dups) = tally(&mut rx, 0, N).await;
    let (plain_got, plain_dups) = tally(&mut prx, 0, N).await;
    eprintln!("{N} QoS 1 to the group: per member {per:?}, {dups} duplicates; plain subscriber {plain_got:?}");
    assert_eq!(dups, 0, "a message reached more than one member");
    assert_eq!(per.values().sum::<u32>(), N, "deliveries to the group: {per:?}");
    assert!(per.get(&1).is_some_and(|n| *n > 0) && per.get(&2).is_some_and(|n| *n > 0), "{per:?}");
    assert_eq!((plain_got.get(&0).copied(), plain_dups), (Some(N), 0), "the plain subscriber beside member 2");

    // Round 2: n2 stopped, and seen down by the others.
    drop(r2);
    let at = n2.stop().await;
    until_down(&n1, 1).await;
    until_down(&n3, 1).await;
    publish_range(&mut p3, "work/x", N, N + N / 2).await;
    publish_range(&mut p1, "work/x", N + N / 2, 2 * N).await;
    let (per, dups) = tally(&mut rx, N, 2 * N).await;
    eprintln!("with n2 down: per member {per:?}, {dups} duplicates");
    assert_eq!((per.get(&1).copied(), dups), (Some(N), 0), "member 1 gets every message while n2 is down");

    // Round 3: n2 back, its member subscribes again.
    let t0 = Instant::now();
    let n2 = start("n2", &[n1.cluster], Some(at)).await;
    converged(&[&n1, &n2, &n3], 2).await;
    let mut m2 = connect(n2.mqtt, Version::V311, "m2", true).await;
    assert_eq!(subscribe(&mut m2, "$share/g/work/#", QoS::AtLeastOnce).await, vec![1]);
    // Probes go to one member each: both get some once n3 and n1 route to n2.
    let (mut a, mut b) = (connect(n1.mqtt, Version::V5, "probe-a", true).await, m2);
    subscribe(&mut a, "work/probe", QoS::AtMostOnce).await;
    until_routed(n3.mqtt, &mut [&mut a, &mut b], "work/probe").await;
    eprintln!("n2 rejoined and its member routed after {:?}", t0.elapsed());
    let _r2 = member(b, "work/x", 2, tx.clone());
    publish_range(&mut p3, "work/x", 2 * N, 2 * N + N / 2).await;
    publish_range(&mut p1, "work/x", 2 * N + N / 2, 3 * N).await;
    let (per, dups) = tally(&mut rx, 2 * N, 3 * N).await;
    eprintln!("after n2 rejoined: per member {per:?}, {dups} duplicates");
    assert_eq!(dups, 0, "a message reached more than one member after the rejoin");
    assert_eq!(per.values().sum::<u32>(), N, "{per:?}");
    assert!(per.get(&2).is_some_and(|n| *n > 0), "the member on the rejoined node gets nothing: {per:?}");
    for n in [n1, n2, n3] {
        n.stop().await;
    }
}

/// A shared group with a member on n2 and one on n3, QoS 1 published on
/// n1 at a steady rate (real `broker` processes). n3 is frozen (SIGSTOP),
/// so that n1's forwards for it pile up unacked (spilled to n1's disk, so
/// n1 keeps acknowledging), then SIGKILLed. Once n1 sees n3 down, what was
/// queued for n3 goes to the member on n2: every acknowledged message
/// reaches the group, and a message reaches both members only if n1 had
/// sent it to n3 already (counted by
/// `broker_cluster_shared_reassigned_total{sent="yes"}`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_messages_queued_for_a_failed_node_go_to_a_member_that_is_up() {
    use common::nodes::{ProcNode, converged as proc_converged};
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = ProcNode::spawn(dir.path(), "n1", &[], &[]);
    let n2 = ProcNode::spawn(dir.path(), "n2", &[n1.cluster], &[]);
    let mut n3 = ProcNode::spawn(dir.path(), "n3", &[n1.cluster], &[]);
    proc_converged(&[&n1, &n2, &n3], Duration::from_secs(20));
    let mut m2 = connect(n2.mqtt, Version::V5, "m2", true).await;
    let mut m3 = connect(n3.mqtt, Version::V5, "m3", true).await;
    assert_eq!(subscribe(&mut m2, "$share/g/fail/#", QoS::AtLeastOnce).await, vec![1]);
    assert_eq!(subscribe(&mut m3, "$share/g/fail/#", QoS::AtLeastOnce).await, vec![1]);
    until_routed(n1.mqtt, &mut [&mut m2, &mut m3], "fail/probe").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _r2 = member(m2, "fail/x", 2, tx.clone());
    let _r3 = member(m3, "fail/x", 3, tx.clone());
    let mut p = connect(n1.mqtt, Version::V5, "pub1", true).await;
    let mut acked = std::collections::HashSet::new();
    let mut k = 0u32;
    // 20 messages every 10 ms for `d`.
    let mut steady = async |p: &mut Client, d: Duration, acked: &mut std::collections::HashSet<u32>| {
        let end = Instant::now() + d;
        while Instant::now() < end {
            for _ in 0..20 {
                p.wr.queue(&publish("fail/x", QoS::AtLeastOnce, (k % 60_000) as u16 + 1, k.to_be_bytes().to_vec()));
                k += 1;
            }
            p.wr.flush().await.expect("publish");
            for _ in 0..20 {
                match p.recv(Duration::from_secs(10)).await.expect("puback") {
                    Packet::PubAck(a) if a.code == 0 => {
                        acked.insert(u32::from(a.pid) - 1);
                    }
                    other => panic!("expected PUBACK, got {other:?}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    steady(&mut p, Duration::from_millis(500), &mut acked).await;
    n3.freeze();
    steady(&mut p, Duration::from_millis(800), &mut acked).await;
    let queued = n1.member("n3").expect("n3 in n1's members")["forward_queue"].as_u64().unwrap_or(0);
    n3.kill9();
    let killed = Instant::now();
    eprintln!("n3 frozen, then SIGKILLed with {queued} forwards queued for it on n1");
    assert!(queued > 0, "nothing queued on n1 for the frozen node");
    steady(&mut p, Duration::from_secs(3), &mut acked).await;
    let total = k;
    assert_eq!(acked.len() as u32, total, "n1 stopped acknowledging");
    // Everything acknowledged reaches the group.
    let mut got: HashMap<u32, Vec<usize>> = HashMap::new();
    let bound = Duration::from_secs(15);
    while got.len() < total as usize {
        let left = bound.saturating_sub(killed.elapsed());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((who, n))) => got.entry(n).or_default().push(who),
            _ => {
                panic!("{} of {total} acknowledged messages reached the group within {bound:?} of the kill", got.len())
            }
        }
    }
    let took = killed.elapsed();
    while let Ok(Some((who, n))) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        got.entry(n).or_default().push(who);
    }
    let twice = got.values().filter(|w| w.len() > 1).count() as u64;
    let on3 = got.values().filter(|w| w.contains(&3)).count();
    let m = n1.metrics();
    let (sent_no, sent_yes) = (
        metric(&m, "broker_cluster_shared_reassigned_total{node=\"n1\",sent=\"no\"}") as u64,
        metric(&m, "broker_cluster_shared_reassigned_total{node=\"n1\",sent=\"yes\"}") as u64,
    );
    eprintln!(
        "{total} QoS 1 acknowledged: all reached the group {took:?} after the kill (bound {bound:?}); {on3} on n3's \
         member; {sent_no} reassigned unsent, {sent_yes} reassigned after a send; {twice} reached both members"
    );
    assert!(sent_no + sent_yes > 0, "n1 reassigned nothing of what was queued for n3");
    assert!(twice <= sent_yes, "{twice} messages reached both members, only {sent_yes} could have");
    assert!(got.values().all(|w| w.iter().all(|&who| who == 2 || who == 3)));
}

/// The retained messages a new subscriber to `filter` on `node` gets, as
/// (topic, payload), sorted.
async fn retained_on(node: &Node, filter: &str) -> Vec<(String, String)> {
    let mut c = connect(node.mqtt, Version::V5, "retained-reader", true).await;
    subscribe(&mut c, filter, QoS::AtLeastOnce).await;
    let mut out = Vec::new();
    while let Ok(pkt) = c.recv(Duration::from_millis(300)).await {
        if let Packet::Publish(m) = pkt {
            if m.qos == QoS::AtLeastOnce {
                c.send(&Packet::PubAck(Ack::new(m.pid, 0))).await.expect("puback");
            }
            if m.retain {
                out.push((m.topic.clone(), String::from_utf8_lossy(&m.payload).into_owned()));
            }
        }
    }
    out.sort();
    out
}

/// Polls `retained_on` until it returns `want` (replication is
/// asynchronous), failing after 10 s with what it saw.
async fn until_retained(node: &Node, filter: &str, want: &[(&str, &str)]) -> Duration {
    let t0 = Instant::now();
    let want: Vec<(String, String)> = want.iter().map(|(t, p)| (t.to_string(), p.to_string())).collect();
    loop {
        let got = retained_on(node, filter).await;
        if got == want {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "retained on {}: {got:?}, expected {want:?}", node.name);
    }
}

async fn retain(node: &Node, topic: &str, payload: &str) {
    let mut c = connect(node.mqtt, Version::V311, "retainer", true).await;
    let mut p = publish(topic, QoS::AtLeastOnce, 1, payload.as_bytes().to_vec());
    if let Packet::Publish(m) = &mut p {
        m.retain = true;
    }
    c.send(&p).await.expect("publish");
    assert!(matches!(c.recv(Duration::from_secs(5)).await, Ok(Packet::PubAck(_))), "retained publish acknowledged");
}

/// A retained message set on node 1 is what a new subscriber on node 2 gets;
/// a clear on node 2 clears it on node 1; a node that joins later gets the
/// set; a node restarted from its data directory drops what was cleared
/// while it was away and gets what was set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_visible_from_every_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = start("n1", &[], None).await;
    let n2 = common::cluster::start_with("n2", &[n1.cluster], None, Some(dir.path())).await;
    converged(&[&n1, &n2], 1).await;
    retain(&n1, "r/a", "one").await;
    retain(&n1, "r/b", "two").await;
    let took = until_retained(&n2, "r/#", &[("r/a", "one"), ("r/b", "two")]).await;
    eprintln!("retained set on n1 visible on n2 after {took:?}");
    retain(&n2, "r/a", "").await;
    let took = until_retained(&n1, "r/#", &[("r/b", "two")]).await;
    eprintln!("clear on n2 seen on n1 after {took:?}");
    // A node that joins now gets the set.
    let n3 = start("n3", &[n1.cluster], None).await;
    converged(&[&n1, &n2, &n3], 2).await;
    until_retained(&n3, "r/#", &[("r/b", "two")]).await;
    // n2 away: r/b cleared and r/c set meanwhile; n2 restarts with r/b on disk.
    let at = n2.stop().await;
    retain(&n3, "r/b", "").await;
    retain(&n1, "r/c", "three").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = broker::store::Store::open(dir.path()) {
        assert!(Instant::now() < deadline, "the stopped node's store stays open: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n2 = common::cluster::start_with("n2", &[n1.cluster], Some(at), Some(dir.path())).await;
    let took = until_retained(&n2, "r/#", &[("r/c", "three")]).await;
    eprintln!("restarted n2 dropped the cleared r/b and got r/c after {took:?}");
    // And n2's restored store did not bring r/b back anywhere.
    until_retained(&n1, "r/#", &[("r/c", "three")]).await;
    until_retained(&n3, "r/#", &[("r/c", "three")]).await;
    for n in [n1, n2, n3] {
        n.stop().await;
    }
}
