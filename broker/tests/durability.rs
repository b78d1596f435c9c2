//! Durability across `kill -9`: what the broker acknowledged for a
//! persistent session is delivered after a restart (QoS 1 at least once,
//! QoS 2 exactly once), and retained messages survive.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use broker::client::{Client, connect_packet};
use broker::codec::{Ack, Packet, Properties, PropertyValues, QoS, Version};
use bytes::Bytes;
use common::*;

/// Publishes `n` messages at `qos` in pipelined batches and waits for every
/// broker acknowledgement (PUBACK, or PUBREC then PUBCOMP).
async fn publish_acked(p: &mut Client, qos: QoS, first_pid: u16, n: u32, tag: &str) {
    let batch = 500;
    let mut sent = 0;
    while sent < n {
        let k = batch.min(n - sent);
        for i in 0..k {
            let seq = sent + i;
            let pid = first_pid + (i as u16);
            let mut pk = broker::client::publish(&format!("dur/{tag}"), qos, pid, Bytes::from(format!("{tag}-{seq}")));
            if let Packet::Publish(x) = &mut pk {
                x.retain = false;
            }
            p.wr.queue(&pk);
        }
        p.wr.flush().await.expect("flush publishes");
        let mut recs = 0;
        while recs < k {
            match p.recv(Duration::from_secs(30)).await.expect("ack from broker") {
                Packet::PubAck(a) if qos == QoS::AtLeastOnce => {
                    assert_eq!(a.code, 0);
                    recs += 1;
                }
                Packet::PubRec(a) if qos == QoS::ExactlyOnce => {
                    assert_eq!(a.code, 0);
                    p.wr.queue(&Packet::PubRel(Ack::new(a.pid, 0)));
                    recs += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        if qos == QoS::ExactlyOnce {
            p.wr.flush().await.expect("flush pubrel");
            for _ in 0..k {
                assert!(matches!(p.recv(Duration::from_secs(30)).await.expect("pubcomp"), Packet::PubComp(_)));
            }
        }
        sent += k;
    }
}

async fn durability_case(extra: &[&str], n1: u32, n2: u32) {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut b = BrokerProc::spawn(dir.path(), port, extra);
    let sub_props: Properties = PropertyValues { session_expiry: Some(3600), ..Default::default() }.into();
    let mut sc = connect_packet(Version::V5, "dur-sub", true, 30);
    sc.props = sub_props.clone();
    let (mut sub, _) = Client::connect(b.addr, sc).await.expect("subscriber connects");
    assert_eq!(subscribe(&mut sub, "dur/#", QoS::ExactlyOnce).await, vec![2]);
    sub.send(&Packet::Disconnect(broker::codec::Disconnect { code: 0, props: Properties::default() }))
        .await
        .expect("disconnect");
    drop(sub);
    let mut p = connect(b.addr, Version::V311, "dur-pub", true).await;
    p.send(&{
        let mut r = broker::client::publish("keep/me", QoS::AtLeastOnce, 1, Bytes::from_static(b"retained"));
        if let Packet::Publish(x) = &mut r {
            x.retain = true;
        }
        r
    })
    .await
    .expect("send retained");
    assert!(matches!(next(&mut p).await, Packet::PubAck(_)));
    let t0 = Instant::now();
    publish_acked(&mut p, QoS::AtLeastOnce, 1, n1, "q1").await;
    publish_acked(&mut p, QoS::ExactlyOnce, 1000, n2, "q2").await;
    eprintln!("{} QoS 1 + {} QoS 2 acknowledged in {:?}", n1, n2, t0.elapsed());
    // No goodbye: SIGKILL right after the last acknowledgement.
    b.kill9();
    drop(p);
    let b = BrokerProc::spawn(dir.path(), port, extra);
    let mut sc = connect_packet(Version::V5, "dur-sub", false, 30);
    sc.props = sub_props;
    let (mut sub, ack) = Client::connect(b.addr, sc).await.expect("subscriber reconnects");
    assert!(ack.session_present, "persistent session must survive kill -9");
    let mut counts: HashMap<String, u32> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let want = (n1 + n2) as usize;
    while counts.len() < want {
        assert!(Instant::now() < deadline, "only {} of {want} messages after restart", counts.len());
        let pk = match sub.recv(Duration::from_secs(10)).await {
            Ok(pk) => pk,
            Err(e) => panic!("subscriber got {} of {want} messages, then: {e}", counts.len()),
        };
        match pk {
            Packet::Publish(m) => {
                let body = String::from_utf8(m.payload.to_vec()).expect("utf8 payload");
                *counts.entry(body).or_default() += 1;
                match m.qos {
                    QoS::AtLeastOnce => sub.wr.queue(&Packet::PubAck(Ack::new(m.pid, 0))),
                    QoS::ExactlyOnce => sub.wr.queue(&Packet::PubRec(Ack::new(m.pid, 0))),
                    QoS::AtMostOnce => panic!("QoS 0 delivery of {}", m.topic),
                }
            }
            Packet::PubRel(a) => sub.wr.queue(&Packet::PubComp(Ack::new(a.pid, 0))),
            other => panic!("unexpected {other:?}"),
        }
        sub.wr.flush().await.expect("flush acks");
    }
    // Drain the remaining QoS 2 handshakes and any stray duplicate.
    sub.wr.flush().await.expect("flush");
    while let Ok(pk) = sub.recv(Duration::from_millis(500)).await {
        match pk {
            Packet::Publish(m) => {
                let body = String::from_utf8(m.payload.to_vec()).expect("utf8 payload");
                *counts.entry(body).or_default() += 1;
                if m.qos == QoS::AtLeastOnce {
                    sub.send(&Packet::PubAck(Ack::new(m.pid, 0))).await.expect("ack");
                } else {
                    sub.send(&Packet::PubRec(Ack::new(m.pid, 0))).await.expect("ack");
                }
            }
            Packet::PubRel(a) => sub.send(&Packet::PubComp(Ack::new(a.pid, 0))).await.expect("pubcomp"),
            other => panic!("unexpected {other:?}"),
        }
    }
    for i in 0..n1 {
        assert!(counts.get(&format!("q1-{i}")).is_some_and(|c| *c >= 1), "QoS 1 message {i} lost");
    }
    for i in 0..n2 {
        assert_eq!(counts.get(&format!("q2-{i}")).copied(), Some(1), "QoS 2 message {i} not exactly once");
    }
    // Retained message survived too.
    let mut r = connect(b.addr, Version::V311, "ret-check", true).await;
    subscribe(&mut r, "keep/#", QoS::AtMostOnce).await;
    match next(&mut r).await {
        Packet::Publish(m) => assert_eq!((&m.payload[..], m.retain), (&b"retained"[..], true)),
        other => panic!("expected the retained message, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_keeps_10000_qos1_and_1000_qos2_fsync_every_ack() {
    durability_case(&["--fsync", "every-ack"], 10_000, 1_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_keeps_messages_fsync_group_commit() {
    durability_case(&["--fsync", "group", "--group-commit-ms", "10"], 2_000, 200).await;
}

/// An outgoing QoS 2 message whose PUBREC the broker got before a kill -9 is
/// finished with PUBREL after the restart, never delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_qos2_handshake_resends_pubrel_not_publish() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut b = BrokerProc::spawn(dir.path(), port, &[]);
    let sc = connect_packet(Version::V311, "q2-sub", false, 30);
    let (mut sub, _) = Client::connect(b.addr, sc.clone()).await.expect("connect");
    subscribe(&mut sub, "h/#", QoS::ExactlyOnce).await;
    let mut p = connect(b.addr, Version::V311, "q2-pub", true).await;
    p.send(&broker::client::publish("h/t", QoS::ExactlyOnce, 1, Bytes::from_static(b"once"))).await.expect("send");
    assert!(matches!(next(&mut p).await, Packet::PubRec(_)));
    let Packet::Publish(m) = next(&mut sub).await else { panic!("no delivery") };
    sub.send(&Packet::PubRec(Ack::new(m.pid, 0))).await.expect("pubrec");
    // PUBREL is sent only after the released state is on disk.
    assert_eq!(next(&mut sub).await, Packet::PubRel(Ack::new(m.pid, 0)));
    b.kill9();
    drop(sub);
    let b = BrokerProc::spawn(dir.path(), port, &[]);
    let (mut sub, ack) = Client::connect(b.addr, sc).await.expect("reconnect");
    assert!(ack.session_present);
    assert_eq!(next(&mut sub).await, Packet::PubRel(Ack::new(m.pid, 0)));
    sub.send(&Packet::PubComp(Ack::new(m.pid, 0))).await.expect("pubcomp");
    nothing(&mut sub, Duration::from_millis(500)).await;
}

/// PUBCOMP for an incoming QoS 2 message goes out only once the broker has
/// forgotten the packet id on disk: the publisher may reuse the id at once,
/// and a broker that still remembered it after a kill -9 would take the new
/// message for a resend and drop it. A 200 ms group commit makes the window
/// between "forgotten in memory" and "forgotten on disk" wide enough that a
/// kill -9 right after PUBCOMP always fell into it before the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_right_after_pubcomp_keeps_a_reused_packet_id_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let slow = ["--fsync", "group", "--group-commit-ms", "200"];
    let mut b = BrokerProc::spawn(dir.path(), port, &slow);
    let sc = connect_packet(Version::V311, "reuse-sub", false, 30);
    let (mut sub, _) = Client::connect(b.addr, sc.clone()).await.expect("connect subscriber");
    subscribe(&mut sub, "reuse/#", QoS::AtLeastOnce).await;
    drop(sub);
    let pc = connect_packet(Version::V311, "reuse-pub", false, 30);
    let (mut p, _) = Client::connect(b.addr, pc.clone()).await.expect("connect publisher");
    let publish7 =
        |payload: &'static [u8]| broker::client::publish("reuse/t", QoS::ExactlyOnce, 7, Bytes::from_static(payload));
    p.send(&publish7(b"first")).await.expect("publish first");
    assert_eq!(next(&mut p).await, Packet::PubRec(Ack::new(7, 0)));
    // Let the store thread finish with the PUBREC first: a PUBCOMP that finds
    // an earlier ack still queued there waits behind the next commit anyway,
    // which would hide the bug this test is about.
    tokio::time::sleep(Duration::from_millis(50)).await;
    p.send(&Packet::PubRel(Ack::new(7, 0))).await.expect("pubrel");
    assert_eq!(next(&mut p).await, Packet::PubComp(Ack::new(7, 0)));
    b.kill9();
    drop(p);

    let b = BrokerProc::spawn(dir.path(), port, &slow);
    let (mut p, ack) = Client::connect(b.addr, pc).await.expect("reconnect publisher");
    assert!(ack.session_present);
    p.send(&publish7(b"second")).await.expect("publish second with the same id");
    assert_eq!(next(&mut p).await, Packet::PubRec(Ack::new(7, 0)));
    p.send(&Packet::PubRel(Ack::new(7, 0))).await.expect("pubrel");
    assert_eq!(next(&mut p).await, Packet::PubComp(Ack::new(7, 0)));

    let (mut sub, ack) = Client::connect(b.addr, sc).await.expect("reconnect subscriber");
    assert!(ack.session_present);
    let mut got = Vec::new();
    while let Ok(pk) = sub.recv(Duration::from_secs(2)).await {
        let Packet::Publish(m) = pk else { continue };
        sub.send(&Packet::PubAck(Ack::new(m.pid, 0))).await.expect("puback");
        got.push(m.payload.clone());
    }
    assert_eq!(got, [Bytes::from_static(b"first"), Bytes::from_static(b"second")], "both messages, once each");
}
