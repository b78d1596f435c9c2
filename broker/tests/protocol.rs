//! Core protocol behaviour with the project's own client over real TCP, for
//! MQTT 3.1.1 and 5.0.

mod common;

use std::time::Duration;

use broker::client::connect_packet;
use broker::codec::{Ack, Packet, Properties, PropertyValues, QoS, Version, Will, reason};
use bytes::Bytes;
use common::*;

const VERSIONS: [Version; 2] = [Version::V311, Version::V5];

fn pubp(topic: &str, qos: QoS, pid: u16, payload: &'static [u8], retain: bool) -> Packet {
    let mut p = broker::client::publish(topic, qos, pid, Bytes::from_static(payload));
    if let Packet::Publish(x) = &mut p {
        x.retain = retain;
    }
    p
}

fn as_publish(p: Packet) -> broker::codec::Publish {
    match p {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_1_2_in_both_directions() {
    let b = start(|_| {}).await;
    for v in VERSIONS {
        let mut sub = connect(b.addr, v, &format!("sub-{v:?}"), true).await;
        assert_eq!(subscribe(&mut sub, "q/#", QoS::ExactlyOnce).await, vec![2]);
        let mut publ = connect(b.addr, v, &format!("pub-{v:?}"), true).await;
        publ.send(&pubp("q/0", QoS::AtMostOnce, 0, b"zero", false)).await.expect("send");
        publ.send(&pubp("q/1", QoS::AtLeastOnce, 11, b"one", false)).await.expect("send");
        assert_eq!(next(&mut publ).await, Packet::PubAck(Ack::new(11, 0)));
        publ.send(&pubp("q/2", QoS::ExactlyOnce, 12, b"two", false)).await.expect("send");
        assert_eq!(next(&mut publ).await, Packet::PubRec(Ack::new(12, 0)));
        publ.send(&Packet::PubRel(Ack::new(12, 0))).await.expect("send");
        assert_eq!(next(&mut publ).await, Packet::PubComp(Ack::new(12, 0)));

        let p0 = as_publish(next(&mut sub).await);
        assert_eq!((p0.topic.as_str(), p0.qos, &p0.payload[..]), ("q/0", QoS::AtMostOnce, &b"zero"[..]));
        let p1 = as_publish(next(&mut sub).await);
        assert_eq!((p1.topic.as_str(), p1.qos, p1.dup), ("q/1", QoS::AtLeastOnce, false));
        assert_ne!(p1.pid, 0);
        sub.send(&Packet::PubAck(Ack::new(p1.pid, 0))).await.expect("send");
        let p2 = as_publish(next(&mut sub).await);
        assert_eq!((p2.topic.as_str(), p2.qos), ("q/2", QoS::ExactlyOnce));
        assert_ne!(p2.pid, p1.pid, "packet ids in flight must differ");
        sub.send(&Packet::PubRec(Ack::new(p2.pid, 0))).await.expect("send");
        assert_eq!(next(&mut sub).await, Packet::PubRel(Ack::new(p2.pid, 0)));
        sub.send(&Packet::PubComp(Ack::new(p2.pid, 0))).await.expect("send");
        // QoS 2 resend of the same packet id before PUBREL is not routed twice.
        publ.send(&pubp("q/2", QoS::ExactlyOnce, 13, b"once", false)).await.expect("send");
        assert_eq!(next(&mut publ).await, Packet::PubRec(Ack::new(13, 0)));
        let mut dup = pubp("q/2", QoS::ExactlyOnce, 13, b"once", false);
        if let Packet::Publish(p) = &mut dup {
            p.dup = true;
        }
        publ.send(&dup).await.expect("send");
        assert_eq!(next(&mut publ).await, Packet::PubRec(Ack::new(13, 0)));
        publ.send(&Packet::PubRel(Ack::new(13, 0))).await.expect("send");
        assert_eq!(next(&mut publ).await, Packet::PubComp(Ack::new(13, 0)));
        let p = as_publish(next(&mut sub).await);
        assert_eq!(&p.payload[..], b"once");
        sub.send(&Packet::PubRec(Ack::new(p.pid, 0))).await.expect("send");
        assert_eq!(next(&mut sub).await, Packet::PubRel(Ack::new(p.pid, 0)));
        sub.send(&Packet::PubComp(Ack::new(p.pid, 0))).await.expect("send");
        nothing(&mut sub, Duration::from_millis(300)).await;
        // Subscription QoS caps delivery QoS.
        let mut low = connect(b.addr, v, &format!("low-{v:?}"), true).await;
        subscribe(&mut low, "q/#", QoS::AtMostOnce).await;
        publ.send(&pubp("q/x", QoS::AtLeastOnce, 14, b"d", false)).await.expect("send");
        assert_eq!(next(&mut publ).await, Packet::PubAck(Ack::new(14, 0)));
        assert_eq!(as_publish(next(&mut low).await).qos, QoS::AtMostOnce);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_set_replace_clear_and_wildcards() {
    let b = start(|_| {}).await;
    for v in VERSIONS {
        let mut p = connect(b.addr, v, "rpub", true).await;
        p.send(&pubp("r/a", QoS::AtLeastOnce, 1, b"first", true)).await.expect("send");
        next(&mut p).await;
        p.send(&pubp("r/a", QoS::AtLeastOnce, 2, b"second", true)).await.expect("send");
        next(&mut p).await;
        p.send(&pubp("r/b/c", QoS::AtMostOnce, 0, b"deep", true)).await.expect("send");
        p.send(&pubp("$SYS/x", QoS::AtMostOnce, 0, b"sys", true)).await.expect("send");
        p.send(&Packet::PingReq).await.expect("send");
        assert_eq!(next(&mut p).await, Packet::PingResp);

        let mut s = connect(b.addr, v, "rsub", true).await;
        subscribe(&mut s, "r/+", QoS::AtLeastOnce).await;
        let m = as_publish(next(&mut s).await);
        assert_eq!((m.topic.as_str(), &m.payload[..], m.retain), ("r/a", &b"second"[..], true));
        s.send(&Packet::PubAck(Ack::new(m.pid, 0))).await.expect("send");
        nothing(&mut s, Duration::from_millis(200)).await;
        // `#` does not match $-topics; `$SYS/#` does.
        subscribe(&mut s, "#", QoS::AtMostOnce).await;
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(as_publish(next(&mut s).await).topic);
        }
        got.sort();
        assert_eq!(got, vec!["r/a", "r/b/c"]);
        subscribe(&mut s, "$SYS/#", QoS::AtMostOnce).await;
        assert_eq!(as_publish(next(&mut s).await).topic, "$SYS/x");
        // Live delivery clears the retain flag (3.3.1.3).
        p.send(&pubp("r/a", QoS::AtMostOnce, 0, b"live", true)).await.expect("send");
        let live = as_publish(next(&mut s).await);
        assert!(!live.retain);
        // Clear with an empty payload.
        for t in ["r/a", "r/b/c", "$SYS/x"] {
            p.send(&pubp(t, QoS::AtMostOnce, 0, b"", true)).await.expect("send");
        }
        p.send(&Packet::PingReq).await.expect("send");
        assert_eq!(next(&mut p).await, Packet::PingResp);
        let mut s2 = connect(b.addr, v, "rsub2", true).await;
        subscribe(&mut s2, "#", QoS::AtMostOnce).await;
        subscribe(&mut s2, "$SYS/#", QoS::AtMostOnce).await;
        nothing(&mut s2, Duration::from_millis(200)).await;
        drop(s);
        drop(p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_on_abnormal_close_only_and_keepalive() {
    let b = start(|_| {}).await;
    for v in VERSIONS {
        let mut w = connect(b.addr, v, "watch", true).await;
        subscribe(&mut w, "will/#", QoS::AtLeastOnce).await;
        let with_will = |id: &str, ka: u16| {
            let mut c = connect_packet(v, id, true, ka);
            c.will = Some(Will {
                topic: format!("will/{id}"),
                payload: Bytes::from_static(b"gone"),
                qos: QoS::AtLeastOnce,
                retain: false,
                props: Properties::default(),
            });
            c
        };
        // Normal DISCONNECT: no will.
        let (mut a, _) = broker::client::Client::connect(b.addr, with_will("a", 30)).await.expect("connect");
        a.send(&Packet::Disconnect(broker::codec::Disconnect { code: 0, props: Properties::default() }))
            .await
            .expect("send");
        nothing(&mut w, Duration::from_millis(300)).await;
        // Dropped TCP connection: will.
        let (c, _) = broker::client::Client::connect(b.addr, with_will("b", 30)).await.expect("connect");
        drop(c);
        let m = as_publish(next(&mut w).await);
        assert_eq!((m.topic.as_str(), &m.payload[..]), ("will/b", &b"gone"[..]));
        w.send(&Packet::PubAck(Ack::new(m.pid, 0))).await.expect("send");
        // Keep alive 1 s: silent client is cut after 1.5 s and its will goes out.
        let t0 = std::time::Instant::now();
        let (mut k, _) = broker::client::Client::connect(b.addr, with_will("k", 1)).await.expect("connect");
        let m = as_publish(next(&mut w).await);
        assert_eq!(m.topic, "will/k");
        let el = t0.elapsed();
        assert!(el >= Duration::from_millis(1400) && el < Duration::from_secs(4), "keep alive timeout after {el:?}");
        w.send(&Packet::PubAck(Ack::new(m.pid, 0))).await.expect("send");
        if v == Version::V5 {
            expect_disconnect(&mut k, reason::KEEP_ALIVE_TIMEOUT).await;
        } else {
            expect_closed(&mut k).await;
        }
        // A client that pings in time stays.
        let mut alive = connect_packet(v, "alive", true, 1);
        alive.keep_alive = 1;
        let (mut al, _) = broker::client::Client::connect(b.addr, alive).await.expect("connect");
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            al.send(&Packet::PingReq).await.expect("ping");
            assert_eq!(next(&mut al).await, Packet::PingResp);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_and_persistent_session_redelivery() {
    let b = start(|_| {}).await;
    for v in VERSIONS {
        let props = if v == Version::V5 {
            PropertyValues { session_expiry: Some(300), ..Default::default() }.into()
        } else {
            Properties::default()
        };
        let id = format!("p-{v:?}");
        let mut s = connect_with(b.addr, v, &id, v == Version::V5, props.clone()).await;
        let mut s_clean = connect_packet(v, &id, false, 30);
        s_clean.props = props.clone();
        subscribe(&mut s, "pers/#", QoS::ExactlyOnce).await;
        let mut p = connect(b.addr, v, &format!("pp-{v:?}"), true).await;
        p.send(&pubp("pers/1", QoS::AtLeastOnce, 1, b"m1", false)).await.expect("send");
        next(&mut p).await;
        // Received but not acknowledged.
        let first = as_publish(next(&mut s).await);
        assert!(!first.dup);
        // Same client id again: the old connection is taken over.
        let (mut s2, ack) = broker::client::Client::connect(b.addr, s_clean.clone()).await.expect("connect");
        assert!(ack.session_present, "session must be present after takeover");
        if v == Version::V5 {
            expect_disconnect(&mut s, reason::SESSION_TAKEN_OVER).await;
        } else {
            expect_closed(&mut s).await;
        }
        let again = as_publish(next(&mut s2).await);
        assert!(again.dup, "unacknowledged message is resent with DUP");
        assert_eq!((again.pid, &again.payload[..]), (first.pid, &b"m1"[..]));
        s2.send(&Packet::PubAck(Ack::new(again.pid, 0))).await.expect("send");
        drop(s2);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Offline: messages are queued.
        for (i, q) in [(2u16, QoS::AtLeastOnce), (3, QoS::ExactlyOnce)] {
            p.send(&pubp("pers/q", q, i, b"queued", false)).await.expect("send");
            let ack = next(&mut p).await;
            if q == QoS::ExactlyOnce {
                assert_eq!(ack, Packet::PubRec(Ack::new(i, 0)));
                p.send(&Packet::PubRel(Ack::new(i, 0))).await.expect("send");
                next(&mut p).await;
            }
        }
        let (mut s3, ack) = broker::client::Client::connect(b.addr, s_clean.clone()).await.expect("connect");
        assert!(ack.session_present);
        let m1 = as_publish(next(&mut s3).await);
        let m2 = as_publish(next(&mut s3).await);
        assert_eq!((m1.qos, m2.qos), (QoS::AtLeastOnce, QoS::ExactlyOnce));
        s3.send(&Packet::PubAck(Ack::new(m1.pid, 0))).await.expect("send");
        s3.send(&Packet::PubRec(Ack::new(m2.pid, 0))).await.expect("send");
        assert_eq!(next(&mut s3).await, Packet::PubRel(Ack::new(m2.pid, 0)));
        drop(s3);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // PUBREL is what is resent after PUBREC.
        let (mut s4, _) = broker::client::Client::connect(b.addr, s_clean.clone()).await.expect("connect");
        assert_eq!(next(&mut s4).await, Packet::PubRel(Ack::new(m2.pid, 0)));
        s4.send(&Packet::PubComp(Ack::new(m2.pid, 0))).await.expect("send");
        nothing(&mut s4, Duration::from_millis(200)).await;
        drop(s4);
        // Clean start discards the session.
        let mut clean = connect_packet(v, &id, true, 30);
        clean.props = props.clone();
        let (_s5, ack) = broker::client::Client::connect(b.addr, clean).await.expect("connect");
        assert!(!ack.session_present);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_get_one_copy_at_max_qos() {
    let b = start(|_| {}).await;
    for v in VERSIONS {
        let mut s = connect(b.addr, v, "ov", true).await;
        subscribe(&mut s, "o/+", QoS::AtMostOnce).await;
        subscribe(&mut s, "o/#", QoS::ExactlyOnce).await;
        subscribe(&mut s, "o/x", QoS::AtLeastOnce).await;
        let mut p = connect(b.addr, v, "ovp", true).await;
        p.send(&pubp("o/x", QoS::ExactlyOnce, 1, b"x", false)).await.expect("send");
        let m = as_publish(next(&mut s).await);
        assert_eq!(m.qos, QoS::ExactlyOnce);
        s.send(&Packet::PubRec(Ack::new(m.pid, 0))).await.expect("send");
        assert!(matches!(next(&mut s).await, Packet::PubRel(_)));
        nothing(&mut s, Duration::from_millis(200)).await;
        // Unsubscribe: v5 reports whether it existed.
        s.send(&Packet::Unsubscribe(broker::codec::Unsubscribe {
            pid: 5,
            props: Properties::default(),
            filters: vec!["o/+".into(), "nope".into()],
        }))
        .await
        .expect("send");
        match next(&mut s).await {
            Packet::UnsubAck(u) => {
                assert_eq!(u.pid, 5);
                if v == Version::V5 {
                    assert_eq!(u.codes, vec![0, reason::NO_SUBSCRIPTION_EXISTED]);
                }
            }
            other => panic!("expected UNSUBACK, got {other:?}"),
        }
    }
}
