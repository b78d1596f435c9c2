//! Bad input: the broker answers per the spec or disconnects that client with
//! the v5 reason code, counts it, and keeps serving everyone else.

mod common;

use std::time::{Duration, Instant};

use broker::client::{Client, connect_packet};
use broker::codec::{Ack, Packet, PropertyValues, QoS, Version, reason};
use bytes::Bytes;
use common::*;

fn closed(body: &str, r: &str) -> f64 {
    metric(body, &format!("broker_connections_closed_total{{node=\"test\",reason=\"{r}\"}}"))
}

async fn wait_metric(b: &TestBroker, series: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http_get(b.http, "/metrics");
        if metric(&body, series) >= want {
            return body;
        }
        assert!(Instant::now() < deadline, "{series} did not reach {want}:\n{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A bystander that must keep working while others misbehave.
async fn bystander_ok(b: &TestBroker, s: &mut Client, p: &mut Client, n: u16) {
    p.send(&broker::client::publish("ok/t", QoS::AtLeastOnce, n, Bytes::from_static(b"fine"))).await.expect("send");
    assert!(matches!(next(p).await, Packet::PubAck(_)));
    match next(s).await {
        Packet::Publish(m) => {
            assert_eq!(&m.payload[..], b"fine");
            s.send(&Packet::PubAck(Ack::new(m.pid, 0))).await.expect("ack");
        }
        other => panic!("bystander got {other:?}"),
    }
    let _ = b;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_forbidden_packets_disconnect_with_reason_codes() {
    let b = start(|c| c.max_packet_size = 1024).await;
    let mut s = connect(b.addr, Version::V5, "by-sub", true).await;
    subscribe(&mut s, "ok/#", QoS::AtLeastOnce).await;
    let mut p = connect(b.addr, Version::V311, "by-pub", true).await;
    let cases: Vec<(&str, Vec<u8>, u8)> = vec![
        ("qos3", vec![0x36, 6, 0, 1, b'a', 0, 1, 0], reason::MALFORMED),
        ("reserved type", vec![0x00, 0], reason::MALFORMED),
        ("subscribe flags", vec![0x80, 7, 0, 1, 0, 0, 1, b'a', 0], reason::MALFORMED),
        ("invalid utf8 topic", vec![0x30, 5, 0, 2, 0xc3, 0x28, 0], reason::MALFORMED),
        ("wildcard in topic", vec![0x30, 6, 0, 3, b'a', b'/', b'#', 0], reason::TOPIC_NAME_INVALID),
        ("remaining length 5 bytes", vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01], reason::MALFORMED),
        (
            "oversized",
            {
                let mut v = vec![0x30, 0xd0, 0x0f, 0, 1, b'a', 0];
                v.extend(std::iter::repeat_n(b'x', 100));
                v
            },
            reason::PACKET_TOO_LARGE,
        ),
        (
            "second connect",
            {
                let mut out = bytes::BytesMut::new();
                broker::codec::encode(
                    &Packet::Connect(Box::new(connect_packet(Version::V5, "x", true, 10))),
                    Version::V5,
                    &mut out,
                );
                out.to_vec()
            },
            reason::PROTOCOL_ERROR,
        ),
        ("packet id 0", vec![0x40, 2, 0, 0], reason::MALFORMED),
        ("topic alias out of range", vec![0x30, 8, 0, 1, b'a', 3, 0x23, 0xff, 0xff, b'x'], reason::TOPIC_ALIAS_INVALID),
        ("unknown topic alias", vec![0x30, 6, 0, 0, 3, 0x23, 0, 1], reason::PROTOCOL_ERROR),
        ("broker-only packet", vec![0x90, 3, 0, 1, 0], reason::PROTOCOL_ERROR),
    ];
    for (i, (name, bytes, code)) in cases.iter().enumerate() {
        // Topic aliases do not exist in 3.1.1: those bytes are a valid PUBLISH there.
        let versions: &[Version] =
            if name.contains("alias out") { &[Version::V5] } else { &[Version::V5, Version::V311] };
        for &v in versions {
            let mut c = connect(b.addr, v, &format!("bad-{i}-{v:?}"), true).await;
            c.wr.send_raw(bytes).await.expect("send raw");
            if v == Version::V5 {
                match c.recv(T).await {
                    Ok(Packet::Disconnect(d)) => assert_eq!(d.code, *code, "{name}: reason code"),
                    other => panic!("{name}: expected DISCONNECT {code:#x}, got {other:?}"),
                }
            }
            expect_closed(&mut c).await;
        }
        bystander_ok(&b, &mut s, &mut p, 100 + i as u16).await;
    }
    let body = wait_metric(&b, "broker_connections_closed_total{node=\"test\",reason=\"malformed\"}", 10.0).await;
    assert!(closed(&body, "packet_too_large") >= 2.0);
    assert!(closed(&body, "topic_name_invalid") >= 2.0);
    assert!(closed(&body, "protocol_error") >= 5.0);
    assert!(closed(&body, "topic_alias_invalid") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_not_first_idle_and_half_open_clients_are_dropped() {
    let b = start(|c| c.connect_timeout_ms = 300).await;
    // Something other than CONNECT first.
    let mut c = Client::tcp(b.addr, Version::V311).await.expect("tcp");
    c.wr.send_raw(&[0xC0, 0]).await.expect("send");
    expect_closed(&mut c).await;
    // Unsupported protocol level: CONNACK 0x01 (3.1.1 form), then close.
    let mut c = Client::tcp(b.addr, Version::V311).await.expect("tcp");
    c.wr.send_raw(&[0x10, 14, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60, 0, 0]).await.expect("send");
    match c.recv(T).await {
        Ok(Packet::ConnAck(a)) => assert_eq!(a.code, 1),
        other => panic!("expected CONNACK 1, got {other:?}"),
    }
    // Connects and sends nothing.
    let t0 = Instant::now();
    let mut idle = Client::tcp(b.addr, Version::V311).await.expect("tcp");
    expect_closed(&mut idle).await;
    assert!(t0.elapsed() < Duration::from_secs(3), "idle connection kept for {:?}", t0.elapsed());
    // Half-open: CONNECT with keep alive 1, then silence (as if the peer vanished).
    let (mut half, _) = Client::connect(b.addr, connect_packet(Version::V311, "half", true, 1)).await.expect("connect");
    expect_closed(&mut half).await;
    // Empty client id with a persistent 3.1.1 session: identifier rejected.
    let (_, ack) = Client::connect(b.addr, connect_packet(Version::V311, "", false, 10)).await.expect("connect");
    assert_eq!(ack.code, 2);
    // Empty client id with v5: one is assigned.
    let (_, ack) = Client::connect(b.addr, connect_packet(Version::V5, "", true, 10)).await.expect("connect");
    assert!(ack.props.assigned_client_id.as_ref().is_some_and(|id| !id.is_empty()));
    let body =
        wait_metric(&b, "broker_connections_closed_total{node=\"test\",reason=\"keepalive_timeout\"}", 1.0).await;
    assert!(closed(&body, "connect_timeout") >= 1.0);
    assert!(closed(&body, "protocol_error") >= 1.0);
    assert!(closed(&body, "unsupported_version") >= 1.0);
    assert!(closed(&body, "client_id_invalid") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_and_packet_id_reuse_and_client_max_packet_size() {
    let b = start(|c| c.receive_maximum = 2).await;
    // QoS 2 publishes stay unacknowledged until PUBREL: the third exceeds 2.
    let mut c = connect(b.addr, Version::V5, "rm", true).await;
    for pid in 1..=3u16 {
        c.send(&broker::client::publish("rm/t", QoS::ExactlyOnce, pid, Bytes::from_static(b"x"))).await.expect("send");
    }
    let mut got_disconnect = false;
    for _ in 0..4 {
        match c.recv(T).await {
            Ok(Packet::PubRec(_)) => {}
            Ok(Packet::Disconnect(d)) => {
                assert_eq!(d.code, reason::RECEIVE_MAX_EXCEEDED);
                got_disconnect = true;
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got_disconnect, "receive maximum not enforced");
    // QoS 1 packet id reused before its PUBACK: both delivered (at least once).
    let mut s = connect(b.addr, Version::V311, "reuse-sub", true).await;
    subscribe(&mut s, "reuse/#", QoS::AtMostOnce).await;
    let mut p = connect(b.addr, Version::V311, "reuse-pub", true).await;
    p.wr.queue(&broker::client::publish("reuse/t", QoS::AtLeastOnce, 5, Bytes::from_static(b"a")));
    p.wr.queue(&broker::client::publish("reuse/t", QoS::AtLeastOnce, 5, Bytes::from_static(b"b")));
    p.wr.flush().await.expect("flush");
    assert_eq!(next(&mut p).await, Packet::PubAck(Ack::new(5, 0)));
    assert_eq!(next(&mut p).await, Packet::PubAck(Ack::new(5, 0)));
    for want in [&b"a"[..], b"b"] {
        match next(&mut s).await {
            Packet::Publish(m) => assert_eq!(&m.payload[..], want),
            other => panic!("unexpected {other:?}"),
        }
    }
    // The client's maximum packet size: larger messages are not sent, and counted.
    let mut small = connect_with(
        b.addr,
        Version::V5,
        "small",
        true,
        PropertyValues { maximum_packet_size: Some(100), ..Default::default() }.into(),
    )
    .await;
    subscribe(&mut small, "mp/#", QoS::AtMostOnce).await;
    p.send(&broker::client::publish("mp/t", QoS::AtMostOnce, 0, Bytes::from(vec![b'x'; 200]))).await.expect("send");
    p.send(&broker::client::publish("mp/t", QoS::AtMostOnce, 0, Bytes::from_static(b"small"))).await.expect("send");
    match next(&mut small).await {
        Packet::Publish(m) => assert_eq!(&m.payload[..], b"small"),
        other => panic!("unexpected {other:?}"),
    }
    let _ = wait_metric(&b, "broker_messages_dropped_total{node=\"test\",reason=\"packet_too_large\",qos=\"0\"}", 1.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connections_and_the_broker_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bp = BrokerProc::spawn(dir.path(), free_port(), &[]);
    let addr = bp.addr;
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let n = 10_000usize;
    let per = 500;
    for chunk in 0..n / per {
        tasks.spawn(async move {
            let mut v = Vec::with_capacity(per);
            for i in 0..per {
                let id = format!("many-{}", chunk * per + i);
                let (c, ack) =
                    Client::connect(addr, connect_packet(Version::V311, &id, true, 0)).await.expect("connect");
                assert_eq!(ack.code, 0);
                v.push(c);
            }
            v
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        all.extend(r.expect("connect task"));
    }
    eprintln!("{n} connections in {:?}", t0.elapsed());
    let (_, body) = http_get(bp.http, "/metrics");
    assert!(metric(&body, "broker_connections{node=\"broker\"}") >= n as f64, "{body}");
    // Still serving: a round trip through the broker.
    let mut s = connect(addr, Version::V5, "after-sub", true).await;
    subscribe(&mut s, "after/#", QoS::AtLeastOnce).await;
    let mut p = connect(addr, Version::V5, "after-pub", true).await;
    p.send(&broker::client::publish("after/t", QoS::AtLeastOnce, 1, Bytes::from_static(b"x"))).await.expect("send");
    assert!(matches!(next(&mut p).await, Packet::PubAck(_)));
    assert!(matches!(next(&mut s).await, Packet::Publish(_)));
    drop(all);
}
