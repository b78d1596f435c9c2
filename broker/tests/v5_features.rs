//! MQTT 5.0 features with the project's client: topic aliases both ways,
//! retain handling / retain-as-published, subscription identifiers, shared
//! subscriptions, session and message expiry, will delay, CONNACK
//! properties, reason codes, authentication.

mod common;

use std::time::{Duration, Instant};

use broker::client::{Client, connect_packet};
use broker::codec::{
    Ack, Disconnect, Packet, Properties, PropertyValues, Publish, QoS, SubOptions, Version, Will, reason,
};
use bytes::Bytes;
use common::*;

const V5: Version = Version::V5;

fn publish(topic: &str, qos: QoS, pid: u16, payload: &'static [u8], retain: bool, props: Properties) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain,
        topic: topic.into(),
        pid,
        props,
        payload: Bytes::from_static(payload),
    })
}

fn got(p: Packet) -> Publish {
    match p {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_properties_and_reason_codes() {
    let b = start(|c| c.max_keep_alive = 5).await;
    let mut cp = connect_packet(V5, "", true, 60);
    cp.props.request_response_info = Some(1);
    let (mut c, ack) = Client::connect(b.addr, cp).await.expect("connect");
    let p = &ack.props;
    assert_eq!(p.server_keep_alive, Some(5));
    assert!(p.assigned_client_id.is_some());
    assert!(p.response_info.is_some());
    assert_eq!(p.receive_maximum, Some(1024));
    assert_eq!(p.maximum_packet_size, Some(1 << 20));
    assert_eq!(p.topic_alias_maximum, Some(64));
    assert_eq!(
        (p.retain_available, p.wildcard_sub_available, p.sub_id_available, p.shared_sub_available),
        (Some(1), Some(1), Some(1), Some(1))
    );
    // Enhanced authentication is not offered: 0x8C.
    let mut am = connect_packet(V5, "am", true, 30);
    am.props.auth_method = Some("SCRAM-SHA-1".into());
    let (_, refused) = Client::connect(b.addr, am).await.expect("connect");
    assert_eq!(refused.code, reason::BAD_AUTH_METHOD);
    // No subscribers: 0x10 on PUBACK.
    c.send(&publish("nobody/here", QoS::AtLeastOnce, 1, b"x", false, Properties::default())).await.expect("send");
    assert_eq!(next(&mut c).await, Packet::PubAck(Ack::new(1, reason::NO_MATCHING_SUBSCRIBERS)));
    // Payload format 1 with bytes that are not UTF-8: 0x99.
    let props = PropertyValues { payload_format: Some(1), ..Default::default() }.into();
    c.send(&publish("x/y", QoS::AtLeastOnce, 2, b"\xff\xfe", false, props)).await.expect("send");
    assert_eq!(next(&mut c).await, Packet::PubAck(Ack::new(2, reason::PAYLOAD_FORMAT_INVALID)));
    // Invalid filter: 0x8F in SUBACK.
    assert_eq!(subscribe(&mut c, "a/#/b", QoS::AtMostOnce).await, vec![reason::TOPIC_FILTER_INVALID]);
    assert_eq!(subscribe(&mut c, "$share/bad", QoS::AtMostOnce).await, vec![reason::TOPIC_FILTER_INVALID]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_in_both_directions() {
    let b = start(|_| {}).await;
    let mut s = connect_with(
        b.addr,
        V5,
        "ta-s",
        true,
        PropertyValues { topic_alias_maximum: Some(2), ..Default::default() }.into(),
    )
    .await;
    subscribe(&mut s, "ta/#", QoS::AtMostOnce).await;
    let mut p = connect(b.addr, V5, "ta-p", true).await;
    let alias = |a| PropertyValues { topic_alias: Some(a), ..Default::default() }.into();
    p.send(&publish("ta/x", QoS::AtMostOnce, 0, b"1", false, alias(1))).await.expect("send");
    p.send(&publish("", QoS::AtMostOnce, 0, b"2", false, alias(1))).await.expect("send");
    p.send(&publish("ta/y", QoS::AtMostOnce, 0, b"3", false, Properties::default())).await.expect("send");
    p.send(&publish("ta/z", QoS::AtMostOnce, 0, b"4", false, Properties::default())).await.expect("send");
    let m1 = got(next(&mut s).await);
    assert_eq!((m1.topic.as_str(), m1.props.topic_alias, &m1.payload[..]), ("ta/x", Some(1), &b"1"[..]));
    let m2 = got(next(&mut s).await);
    assert_eq!((m2.topic.as_str(), m2.props.topic_alias, &m2.payload[..]), ("", Some(1), &b"2"[..]));
    let m3 = got(next(&mut s).await);
    assert_eq!((m3.topic.as_str(), m3.props.topic_alias), ("ta/y", Some(2)));
    // Beyond the client's maximum: full topic, no alias.
    let m4 = got(next(&mut s).await);
    assert_eq!((m4.topic.as_str(), m4.props.topic_alias), ("ta/z", None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_handling_retain_as_published_and_subscription_ids() {
    let b = start(|_| {}).await;
    let mut p = connect(b.addr, V5, "rh-p", true).await;
    p.send(&publish("rh/a", QoS::AtLeastOnce, 1, b"kept", true, Properties::default())).await.expect("send");
    next(&mut p).await;
    let mut s = connect(b.addr, V5, "rh-s", true).await;
    let opts =
        |rh, rap| SubOptions { qos: QoS::AtMostOnce, no_local: false, retain_as_published: rap, retain_handling: rh };
    subscribe_opts(&mut s, "rh/#", opts(2, false), Properties::default()).await;
    nothing(&mut s, Duration::from_millis(200)).await;
    subscribe_opts(&mut s, "rh/+", opts(1, false), Properties::default()).await;
    assert!(got(next(&mut s).await).retain);
    subscribe_opts(&mut s, "rh/+", opts(1, false), Properties::default()).await;
    nothing(&mut s, Duration::from_millis(200)).await;
    subscribe_opts(&mut s, "rh/+", opts(0, false), Properties::default()).await;
    assert!(got(next(&mut s).await).retain);
    // Live retained publish: flag kept only with retain-as-published.
    let mut s2 = connect(b.addr, V5, "rap", true).await;
    subscribe_opts(&mut s2, "rh/#", opts(2, true), Properties::default()).await;
    p.send(&publish("rh/a", QoS::AtMostOnce, 0, b"live", true, Properties::default())).await.expect("send");
    assert!(got(next(&mut s2).await).retain, "retain-as-published");
    let live: Vec<bool> = vec![got(next(&mut s).await).retain];
    assert_eq!(live, vec![false]);
    // Subscription identifiers of every matching subscription.
    let mut si = connect(b.addr, V5, "si", true).await;
    let id = |n| PropertyValues { subscription_ids: vec![n], ..Default::default() }.into();
    subscribe_opts(&mut si, "si/#", SubOptions::qos(QoS::AtMostOnce), id(5)).await;
    subscribe_opts(&mut si, "si/+", SubOptions::qos(QoS::AtMostOnce), id(600)).await;
    p.send(&publish("si/x", QoS::AtMostOnce, 0, b"i", false, Properties::default())).await.expect("send");
    let mut ids = got(next(&mut si).await).props.subscription_ids.clone();
    ids.sort();
    assert_eq!(ids, vec![5, 600]);
    nothing(&mut si, Duration::from_millis(200)).await;
}

async fn count(cl: &mut Client) -> usize {
    let mut n = 0;
    while cl.recv(Duration::from_millis(300)).await.is_ok() {
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_split_the_stream() {
    let b = start(|_| {}).await;
    let mut a = connect(b.addr, V5, "sh-a", true).await;
    let mut c = connect(b.addr, V5, "sh-c", true).await;
    let mut plain = connect(b.addr, V5, "sh-plain", true).await;
    subscribe(&mut a, "$share/g/sh/#", QoS::AtMostOnce).await;
    subscribe(&mut c, "$share/g/sh/#", QoS::AtMostOnce).await;
    subscribe(&mut plain, "sh/#", QoS::AtMostOnce).await;
    let mut p = connect(b.addr, V5, "sh-p", true).await;
    for _ in 0..10 {
        p.send(&publish("sh/t", QoS::AtMostOnce, 0, b"s", false, Properties::default())).await.expect("send");
    }
    let (na, nc, np) = (count(&mut a).await, count(&mut c).await, count(&mut plain).await);
    assert_eq!((na + nc, np), (10, 10), "shared {na}+{nc}, plain {np}");
    assert!(na > 0 && nc > 0);
    // No-local on a shared subscription is a protocol error.
    let o = SubOptions { qos: QoS::AtMostOnce, no_local: true, retain_as_published: false, retain_handling: 0 };
    a.send(&Packet::Subscribe(broker::codec::Subscribe {
        pid: 3,
        props: Properties::default(),
        filters: vec![("$share/g/x".into(), o)],
    }))
    .await
    .expect("send");
    expect_disconnect(&mut a, reason::PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_and_message_expiry() {
    let b = start(|_| {}).await;
    let exp = |s| PropertyValues { session_expiry: Some(s), ..Default::default() }.into();
    // Session expiry 1 s: gone after it.
    let mut s = connect_with(b.addr, V5, "se", true, exp(1)).await;
    subscribe(&mut s, "se/#", QoS::AtLeastOnce).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let mut cp = connect_packet(V5, "se", false, 30);
    cp.props = exp(60);
    let (mut s, ack) = Client::connect(b.addr, cp.clone()).await.expect("connect");
    assert!(!ack.session_present, "session should have expired");
    subscribe(&mut s, "se/#", QoS::AtLeastOnce).await;
    drop(s);
    // Message expiry while the session is offline.
    let mut p = connect(b.addr, V5, "se-p", true).await;
    let me = |s| PropertyValues { message_expiry: Some(s), ..Default::default() }.into();
    p.send(&publish("se/short", QoS::AtLeastOnce, 1, b"short", false, me(1))).await.expect("send");
    next(&mut p).await;
    p.send(&publish("se/long", QoS::AtLeastOnce, 2, b"long", false, me(60))).await.expect("send");
    next(&mut p).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (mut s, ack) = Client::connect(b.addr, cp.clone()).await.expect("connect");
    assert!(ack.session_present);
    let m = got(next(&mut s).await);
    assert_eq!(&m.payload[..], b"long");
    let left = m.props.message_expiry.expect("remaining expiry");
    assert!((1..=58).contains(&left), "remaining expiry {left}");
    s.send(&Packet::PubAck(Ack::new(m.pid, 0))).await.expect("ack");
    nothing(&mut s, Duration::from_millis(200)).await;
    // DISCONNECT may shorten the expiry to 0: the session ends at once.
    s.send(&Packet::Disconnect(Disconnect { code: 0, props: exp(0) })).await.expect("send");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_s, ack) = Client::connect(b.addr, cp).await.expect("connect");
    assert!(!ack.session_present);
    let (_, body) = http_get(b.http, "/metrics");
    assert!(metric(&body, "broker_messages_dropped_total{node=\"test\",reason=\"expired\",qos=\"1\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_delay_and_disconnect_with_will() {
    let b = start(|_| {}).await;
    let mut w = connect(b.addr, V5, "wd-watch", true).await;
    subscribe(&mut w, "wd/#", QoS::AtMostOnce).await;
    let will_client = |id: &str, delay: u32| {
        let mut c = connect_packet(V5, id, true, 30);
        c.props.session_expiry = Some(30);
        c.will = Some(Will {
            topic: format!("wd/{id}"),
            payload: Bytes::from_static(b"w"),
            qos: QoS::AtMostOnce,
            retain: false,
            props: PropertyValues { will_delay: Some(delay), ..Default::default() }.into(),
        });
        c
    };
    // Delayed will: not at once, after the delay.
    let t0 = Instant::now();
    let (c, _) = Client::connect(b.addr, will_client("late", 1)).await.expect("connect");
    drop(c);
    nothing(&mut w, Duration::from_millis(500)).await;
    let m = got(next(&mut w).await);
    assert_eq!(m.topic, "wd/late");
    assert!(t0.elapsed() >= Duration::from_millis(900), "will came after {:?}", t0.elapsed());
    // Reconnecting within the delay cancels it.
    let (c, _) = Client::connect(b.addr, will_client("back", 2)).await.expect("connect");
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = will_client("back", 2);
    again.clean_start = false;
    let (_c2, _) = Client::connect(b.addr, again).await.expect("connect");
    nothing(&mut w, Duration::from_millis(2500)).await;
    // A clean start ends the old session: its delayed will goes out at once.
    let (c, _) = Client::connect(b.addr, will_client("ended", 30)).await.expect("connect");
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    nothing(&mut w, Duration::from_millis(200)).await;
    let t1 = Instant::now();
    let (_c3, _) = Client::connect(b.addr, will_client("ended", 30)).await.expect("connect");
    assert_eq!(got(next(&mut w).await).topic, "wd/ended");
    assert!(t1.elapsed() < Duration::from_secs(2));
    // DISCONNECT with reason 0x04 sends the will.
    let (mut c, _) = Client::connect(b.addr, will_client("asked", 0)).await.expect("connect");
    c.send(&Packet::Disconnect(Disconnect { code: reason::DISCONNECT_WITH_WILL, props: Properties::default() }))
        .await
        .expect("send");
    assert_eq!(got(next(&mut w).await).topic, "wd/asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_file_authentication() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = dir.path().join("passwd");
    std::fs::write(&pw, "alice:wonder\n").expect("write");
    let b = start(|c| c.password_file = Some(pw.clone())).await;
    for v in [Version::V311, V5] {
        let mut cp = connect_packet(v, "auth", true, 30);
        cp.username = Some("alice".into());
        cp.password = Some(Bytes::from_static(b"wonder"));
        let (_, ack) = Client::connect(b.addr, cp.clone()).await.expect("connect");
        assert_eq!(ack.code, 0);
        cp.password = Some(Bytes::from_static(b"nope"));
        let (_, ack) = Client::connect(b.addr, cp.clone()).await.expect("connect");
        assert_eq!(ack.code, if v == V5 { reason::BAD_USER_OR_PASSWORD } else { 4 });
        cp.username = None;
        cp.password = None;
        let (_, ack) = Client::connect(b.addr, cp).await.expect("connect");
        assert_ne!(ack.code, 0, "anonymous must be refused when a password file is set");
    }
}
