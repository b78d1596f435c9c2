//! Session takeover across cluster nodes: a persistent session follows its
//! client to another node with its undelivered messages, the old connection
//! is told 0x8E, and wills follow MQTT 5 3.1.2.5 / 3.1.1 3.1.2.5. Real gRPC
//! between in-process nodes, real MQTT clients over TCP.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use broker::client::{Client, connect_packet, publish};
use broker::codec::{Ack, ConnAck, Packet, Properties, QoS, Version, Will};
use common::cluster::{converged, publish_all, start, until_routed};
use common::{connect, subscribe};

/// Connects `id` with a will on `topic` (delay `delay` s for MQTT 5) and
/// a session expiry of 300 s for MQTT 5.
async fn connect_full(
    node: std::net::SocketAddr,
    v: Version,
    id: &str,
    clean: bool,
    will: Option<(&str, u32)>,
) -> (Client, ConnAck) {
    let mut c = connect_packet(v, id, clean, 30);
    if v == Version::V5 {
        c.props.session_expiry = Some(300);
    }
    if let Some((topic, delay)) = will {
        let mut props = Properties::default();
        if v == Version::V5 && delay > 0 {
            props.will_delay = Some(delay);
        }
        c.will = Some(Will {
            topic: topic.into(),
            payload: format!("{id} gone").into(),
            qos: QoS::AtLeastOnce,
            retain: false,
            props,
        });
    }
    let (cl, ack) = Client::connect(node, c).await.unwrap_or_else(|e| panic!("connect {id}: {e}"));
    assert_eq!(ack.code, 0, "connack for {id}: {ack:?}");
    (cl, ack)
}

/// Reads until the broker's DISCONNECT (skipping the publishes before it)
/// and returns its reason code.
async fn disconnect_code(c: &mut Client) -> u8 {
    loop {
        match c.recv(Duration::from_secs(10)).await {
            Ok(Packet::Disconnect(d)) => return d.code,
            Ok(_) => {}
            Err(e) => panic!("no DISCONNECT from the old node: {e}"),
        }
    }
}

/// The payloads of messages on `topic` that arrive within `d` (returns
/// early once `enough` arrived).
async fn wills_within(c: &mut Client, topic: &str, d: Duration, enough: usize) -> Vec<String> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + d;
    while enough == 0 || out.len() < enough {
        let Ok(pkt) = c.recv(deadline.saturating_duration_since(tokio::time::Instant::now())).await else {
            break;
        };
        if let Packet::Publish(m) = pkt {
            if m.qos == QoS::AtLeastOnce {
                c.send(&Packet::PubAck(Ack::new(m.pid, 0))).await.expect("puback");
            }
            if m.topic == topic {
                out.push(String::from_utf8_lossy(&m.payload).into_owned());
            }
        }
    }
    out
}

/// A persistent MQTT 5 session on node 1 with 300 QoS 1 messages it has not
/// acknowledged moves to node 2: the client gets all of them there (session
/// present), the old connection gets DISCONNECT 0x8E, and what is published
/// on node 1 afterwards reaches it on node 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_moves_to_another_node() {
    const N: u32 = 300;
    let n1 = start("n1", &[], None).await;
    let n2 = start("n2", &[n1.cluster], None).await;
    converged(&[&n1, &n2], 1).await;
    let (mut old, _) = connect_full(n1.mqtt, Version::V5, "mover", false, None).await;
    assert_eq!(subscribe(&mut old, "mv/#", QoS::AtLeastOnce).await, vec![1]);
    let mut p = connect(n1.mqtt, Version::V5, "pub1", true).await;
    // Delivered to the old connection, never acknowledged by it.
    publish_all(&mut p, "mv/x", N).await;
    let (mut new, ack) = connect_full(n2.mqtt, Version::V5, "mover", false, None).await;
    assert!(ack.session_present, "the session came along: {ack:?}");
    assert_eq!(disconnect_code(&mut old).await, 0x8E, "the old connection is told: session taken over");
    let mut seen = HashSet::new();
    let mut dups = 0;
    while (seen.len() as u32) < N {
        match new.recv(Duration::from_secs(10)).await {
            Ok(Packet::Publish(m)) => {
                new.send(&Packet::PubAck(Ack::new(m.pid, 0))).await.expect("puback");
                if m.topic == "mv/x" && !seen.insert(u32::from_be_bytes(m.payload[..4].try_into().expect("4 bytes"))) {
                    dups += 1;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("the moved session delivered {} of {N}: {e}", seen.len()),
        }
    }
    eprintln!("moved session delivered {} of {N} on n2 (+{dups} duplicates)", seen.len());
    assert_eq!(dups, 0);
    // Its subscription moved too: node 1 now routes to node 2.
    let took = until_routed(n1.mqtt, &mut [&mut new], "mv/probe").await;
    eprintln!("the moved subscription routed from n1 after {took:?}");
    p.send(&publish("mv/after", QoS::AtLeastOnce, 7, &b"after"[..])).await.expect("publish");
    let got = wills_within(&mut new, "mv/after", Duration::from_secs(5), 1).await;
    assert_eq!(got, vec!["after"], "a publish on n1 after the move");
    for n in [n1, n2] {
        n.stop().await;
    }
}

/// Wills on a takeover by another node: MQTT 5 with will delay 0, published;
/// with a delay and the session resumed (clean start 0), not published; with
/// a delay and a clean start, published (the session ends); MQTT 3.1.1,
/// published (no delay exists there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_on_takeover_follow_the_spec() {
    let n1 = start("n1", &[], None).await;
    let n2 = start("n2", &[n1.cluster], None).await;
    converged(&[&n1, &n2], 1).await;
    let mut watch = connect(n2.mqtt, Version::V5, "watcher", true).await;
    subscribe(&mut watch, "will/#", QoS::AtLeastOnce).await;
    until_routed(n1.mqtt, &mut [&mut watch], "will/probe").await;
    let cases: [(&str, Version, u32, bool, bool); 4] = [
        ("v5-nodelay", Version::V5, 0, false, true),
        ("v5-delay-resumed", Version::V5, 30, false, false),
        ("v5-delay-clean", Version::V5, 30, true, true),
        ("v311", Version::V311, 0, false, true),
    ];
    for (id, v, delay, clean_again, published) in cases {
        let topic = format!("will/{id}");
        let (mut old, _) = connect_full(n1.mqtt, v, id, false, Some((&topic, delay))).await;
        let (_new, _) = connect_full(n2.mqtt, v, id, clean_again, None).await;
        if v == Version::V5 {
            assert_eq!(disconnect_code(&mut old).await, 0x8E, "{id}: old connection");
        } else {
            assert!(old.recv(Duration::from_secs(5)).await.is_err(), "{id}: the old 3.1.1 connection is closed");
        }
        // Published: within 5 s; not published: nothing within 1.5 s.
        let got = if published {
            wills_within(&mut watch, &topic, Duration::from_secs(5), 1).await
        } else {
            wills_within(&mut watch, &topic, Duration::from_millis(1500), 0).await
        };
        eprintln!("{id}: will messages seen: {got:?}");
        let want = if published { vec![format!("{id} gone")] } else { Vec::new() };
        assert_eq!(got, want, "{id}: will on takeover");
    }
    for n in [n1, n2] {
        n.stop().await;
    }
}

/// The same client id served on both sides: its persistent session on node
/// 2 (with 200 QoS 1 messages queued while it was offline) is out of reach
/// when the client connects to node 1 (node 2 stopped), so node 1 starts a
/// session of its own. Node 2 comes back from its data directory; the
/// client's next CONNECT on node 1 takes node 2's session over and merges
/// it: the 200 messages arrive, node 2 no longer has the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_both_sides_merge_at_the_next_connect() {
    const N: u32 = 200;
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = start("n1", &[], None).await;
    let n2 = common::cluster::start_with("n2", &[n1.cluster], None, Some(dir.path())).await;
    converged(&[&n1, &n2], 1).await;
    let (mut c, _) = connect_full(n2.mqtt, Version::V5, "twice", false, None).await;
    subscribe(&mut c, "both/#", QoS::AtLeastOnce).await;
    c.send(&Packet::Disconnect(broker::codec::Disconnect { code: 0, props: Properties::default() }))
        .await
        .expect("disconnect");
    drop(c);
    let mut p = connect(n2.mqtt, Version::V5, "pub2", true).await;
    publish_all(&mut p, "both/x", N).await;
    drop(p);
    let at = n2.stop().await;
    // n2 unreachable: n1 serves the client with a session of its own.
    let (c, ack) = connect_full(n1.mqtt, Version::V5, "twice", false, None).await;
    assert!(!ack.session_present, "n1 had no session for the client: {ack:?}");
    drop(c);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = broker::store::Store::open(dir.path()) {
        assert!(std::time::Instant::now() < deadline, "the stopped node's store stays open: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n2 = common::cluster::start_with("n2", &[n1.cluster], Some(at), Some(dir.path())).await;
    converged(&[&n1, &n2], 1).await;
    let (mut c, ack) = connect_full(n1.mqtt, Version::V5, "twice", false, None).await;
    assert!(ack.session_present, "{ack:?}");
    let mut seen = HashSet::new();
    while (seen.len() as u32) < N {
        match c.recv(Duration::from_secs(10)).await {
            Ok(Packet::Publish(m)) => {
                c.send(&Packet::PubAck(Ack::new(m.pid, 0))).await.expect("puback");
                if m.topic == "both/x" {
                    seen.insert(u32::from_be_bytes(m.payload[..4].try_into().expect("4 bytes")));
                }
            }
            Ok(_) => {}
            Err(e) => panic!("merged session delivered {} of {N}: {e}", seen.len()),
        }
    }
    eprintln!("merged session on n1 delivered {} of {N} queued on n2", seen.len());
    // The subscription came along: n2's publishes reach the client on n1.
    until_routed(n2.mqtt, &mut [&mut c], "both/probe").await;
    for n in [n1, n2] {
        n.stop().await;
    }
}
