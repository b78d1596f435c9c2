//! The broker cluster over real gRPC between nodes and real MQTT clients over
//! TCP, all on 127.0.0.1 with ports the kernel picked (port 0). Nodes run in
//! this process so that a restart is a stop and a new start on the same
//! ports; every node is stopped by its guard, also when a test fails.

mod common;

use std::time::{Duration, Instant};

use broker::codec::{Packet, QoS, Version};
use common::cluster::{
    converged, publish_all, publish_all_qos2, receive_all, start, start_cfg, start_with, until_routed,
};
use common::{connect, metric, subscribe};

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

/// A node without a data directory whose forward queue for a stopped peer
/// is full drops no QoS 1 message it would have to acknowledge: beyond the
/// bound the publisher's PUBACKs wait until the peer is back and has acked
/// the forwards (backpressure), and the peer's persistent session gets
/// every message. (Before, the 70 beyond the bound were acknowledged and
/// dropped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_without_a_store_holds_acks_instead_of_dropping() {
    const CAP: u32 = 50;
    const N: u32 = 120;
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = start("n1", &[], None).await;
    let n2 = start_cfg("n2", &[n1.cluster], None, None, |c| c.cluster_forward_queue = CAP as usize).await;
    let n3 = start_with("n3", &[n1.cluster], None, Some(dir.path())).await;
    converged(&[&n1, &n2, &n3], 2).await;
    let mut s3 = connect(n3.mqtt, Version::V311, "persistent3", false).await;
    subscribe(&mut s3, "q/#", QoS::AtLeastOnce).await;
    until_routed(n2.mqtt, &mut [&mut s3], "q/probe").await;
    drop(s3);
    let at = n3.stop().await;
    let mut p = connect(n2.mqtt, Version::V5, "pub2", true).await;
    for k in 0..N {
        p.wr.queue(&broker::client::publish("q/x", QoS::AtLeastOnce, (k + 1) as u16, k.to_be_bytes().to_vec()));
    }
    p.wr.flush().await.expect("publish");
    let mut acked = Vec::new();
    while let Ok(Packet::PubAck(a)) = p.recv(Duration::from_secs(2)).await {
        acked.push(a.pid);
    }
    eprintln!("{} of {N} QoS 1 acknowledged on n2 while n3 was stopped (queue bound {CAP})", acked.len());
    assert_eq!(acked, (1..=CAP as u16).collect::<Vec<_>>(), "acks beyond the bound must wait, in order");
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = broker::store::Store::open(dir.path()) {
        assert!(Instant::now() < deadline, "the stopped node's store stays open: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n3 = start_with("n3", &[n1.cluster], Some(at), Some(dir.path())).await;
    while acked.len() < N as usize {
        match p.recv(Duration::from_secs(15)).await {
            Ok(Packet::PubAck(a)) => acked.push(a.pid),
            other => panic!("after n3's return {} of {N} acknowledged, then {other:?}", acked.len()),
        }
    }
    assert_eq!(acked, (1..=N as u16).collect::<Vec<_>>(), "PUBACKs in order");
    let s3 = connect(n3.mqtt, Version::V311, "persistent3", false).await;
    let (seen, _) = receive_all(s3, "q/x", N).await;
    assert_eq!(seen.len() as u32, N, "acknowledged messages were lost");
    let dropped = metric(&n2.metrics(), "broker_cluster_forwards_total{node=\"n2\",peer=\"n3\",result=\"dropped\"}");
    assert_eq!(dropped, 0.0, "nothing dropped");
    for n in [n1, n2, n3] {
        n.stop().await;
    }
}
