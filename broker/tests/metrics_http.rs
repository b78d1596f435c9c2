//! /health and /metrics over HTTP reflect what the broker did.

mod common;

use broker::codec::{Ack, Packet, QoS, Version};
use bytes::Bytes;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_prometheus_metrics() {
    let b = start(|_| {}).await;
    let (st, body) = http_get(b.http, "/health");
    assert_eq!(st, 200);
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    assert_eq!(http_get(b.http, "/nope").0, 404);

    let mut s = connect(b.addr, Version::V5, "m-sub", true).await;
    subscribe(&mut s, "m/#", QoS::AtLeastOnce).await;
    let mut p = connect(b.addr, Version::V311, "m-pub", true).await;
    let mut r = broker::client::publish("m/r", QoS::AtLeastOnce, 1, Bytes::from_static(b"x"));
    if let Packet::Publish(x) = &mut r {
        x.retain = true;
    }
    p.send(&r).await.expect("send");
    assert!(matches!(next(&mut p).await, Packet::PubAck(_)));
    let Packet::Publish(m) = next(&mut s).await else { panic!("no delivery") };
    s.send(&Packet::PubAck(Ack::new(m.pid, 0))).await.expect("ack");
    // Gauges refresh on the router tick (250 ms).
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let (st, body) = http_get(b.http, "/metrics");
    assert_eq!(st, 200);
    let n = "node=\"test\"";
    assert_eq!(metric(&body, &format!("broker_connections{{{n}}}")), 2.0);
    assert!(metric(&body, &format!("broker_connections_total{{{n}}}")) >= 2.0);
    assert_eq!(metric(&body, &format!("broker_messages_received_total{{{n},qos=\"1\"}}")), 1.0);
    assert_eq!(metric(&body, &format!("broker_messages_sent_total{{{n},qos=\"1\"}}")), 1.0);
    assert_eq!(metric(&body, &format!("broker_retained_messages{{{n}}}")), 1.0);
    assert_eq!(metric(&body, &format!("broker_subscriptions{{{n}}}")), 1.0);
    assert_eq!(metric(&body, &format!("broker_sessions{{{n}}}")), 2.0);
    assert_eq!(metric(&body, &format!("broker_inflight_messages{{{n}}}")), 0.0);
    assert_eq!(metric(&body, &format!("broker_delivery_latency_seconds_count{{{n}}}")), 1.0);
    assert!(metric(&body, &format!("process_resident_memory_bytes{{{n}}}")) > 0.0);
    assert!(body.contains("broker_messages_dropped_total{node=\"test\",reason=\"queue_full\",qos=\"1\"} 0"));
    assert!(body.contains("# TYPE broker_delivery_latency_seconds histogram"));
    drop(p);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let (_, body) = http_get(b.http, "/metrics");
    assert_eq!(metric(&body, &format!("broker_connections{{{n}}}")), 1.0);
    assert_eq!(metric(&body, &format!("broker_connections_closed_total{{{n},reason=\"eof\"}}")), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_topics_publish_broker_stats() {
    let b = start(|c| c.sys_interval_secs = 1).await;
    let mut s = connect(b.addr, Version::V311, "sys", true).await;
    subscribe(&mut s, "$SYS/broker/clients/connected", QoS::AtMostOnce).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        assert!(std::time::Instant::now() < deadline, "no $SYS update");
        if let Packet::Publish(m) = next(&mut s).await {
            assert_eq!(m.topic, "$SYS/broker/clients/connected");
            // Retained from an earlier interval may say 0; a live one counts us.
            if &m.payload[..] == b"1" {
                break;
            }
        }
    }
}
