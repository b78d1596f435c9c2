//! The load client against a real broker: exact accounting, and it keeps
//! counting across a broker kill -9 and restart.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use broker::bench::{BenchArgs, execute};
use common::*;

fn args(addr: std::net::SocketAddr) -> BenchArgs {
    BenchArgs {
        addr,
        sub_addr: None,
        protocol: 5,
        publishers: 2,
        subscribers: 3,
        topics: 0,
        sub_mode: "split".into(),
        rate: 300.0,
        qos_mix: "40/50/10".into(),
        payload: 64,
        duration: 1.5,
        drain: 5.0,
        persistent: false,
        inflight: 50,
        prefix: "bt".into(),
        id_prefix: "bt".into(),
        json: true,
        latency_samples: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_every_message_per_qos() {
    let b = start(|_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    for protocol in [3, 5] {
        let mut a = args(b.addr);
        a.protocol = protocol;
        a.id_prefix = format!("bt{protocol}");
        let samples = dir.path().join(format!("lat-{protocol}"));
        a.latency_samples = Some(samples.clone());
        let r = execute(&a).await.expect("bench runs");
        // One sample per message received, each a number of microseconds.
        let text = std::fs::read_to_string(&samples).expect("samples written");
        let lines: Vec<u32> = text.lines().map(|l| l.parse().expect("a number")).collect();
        assert_eq!(lines.len() as u64, r.total.received, "one latency sample per message received");
        for (q, x) in r.qos.iter().enumerate() {
            assert!(x.sent > 0, "qos {q}: nothing sent");
            // split mode, 3 subscribers over 2 topics: subscriber 2 shares topic 0.
            assert!(x.expected > x.sent, "qos {q}: expected {} sent {}", x.expected, x.sent);
            assert_eq!((x.received, x.lost, x.duplicated), (x.expected, 0, 0), "qos {q}: {x:?}");
            assert!(x.latency_ms.p50 > 0.0 && x.latency_ms.p99 >= x.latency_ms.p50);
        }
        assert_eq!(r.publisher_reconnects + r.subscriber_reconnects, 0);
        let json = serde_json::to_value(&r).expect("json");
        assert!(json["qos"][1]["latency_ms"]["p99"].is_number());
    }
}

/// `worker_threads > 1` spreads connections over several event-loop threads:
/// the same exact accounting must hold when router, readers and writers run
/// on different threads, for clean and for persistent sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_every_message_with_four_event_loop_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bp = BrokerProc::spawn(dir.path(), free_port(), &["--worker-threads", "4"]);
    for persistent in [false, true] {
        let mut a = args(bp.addr);
        a.publishers = 4;
        a.subscribers = 4;
        a.persistent = persistent;
        a.id_prefix = format!("mw{persistent}");
        let r = execute(&a).await.expect("bench runs");
        for (q, x) in r.qos.iter().enumerate() {
            assert!(x.sent > 0, "qos {q}: nothing sent");
            assert_eq!(
                (x.received, x.lost, x.duplicated),
                (x.expected, 0, 0),
                "persistent {persistent}, qos {q}: {x:?}"
            );
            assert_eq!(x.out_of_order, 0, "persistent {persistent}, qos {q}: {x:?}");
        }
        assert_eq!(r.publisher_reconnects + r.subscriber_reconnects, 0);
    }
    let (status, body) = http_get(bp.http, "/metrics");
    assert_eq!(status, 200);
    let dropped: f64 = body
        .lines()
        .filter(|l| l.starts_with("broker_messages_dropped_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(dropped, 0.0, "the broker dropped messages:\n{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_survives_broker_kill9_and_keeps_qos1_with_persistent_sessions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut bp = BrokerProc::spawn(dir.path(), port, &[]);
    let child = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["bench", "--addr", &bp.addr.to_string(), "--protocol", "5", "--publishers", "2", "--subscribers", "2"])
        .args(["--rate", "200", "--qos-mix", "0/100/0", "--duration", "4", "--drain", "15", "--persistent", "--json"])
        .args(["--prefix", "kill", "--id-prefix", "kill"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn broker bench");
    let mut bench = ChildGuard(child);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    bp.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _bp2 = BrokerProc::spawn(dir.path(), port, &[]);
    let deadline = Instant::now() + Duration::from_secs(40);
    let st = loop {
        if let Some(st) = bench.0.try_wait().expect("try_wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "bench did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(st.success(), "bench failed: {st}");
    let mut out = String::new();
    use std::io::Read;
    bench.0.stdout.take().expect("stdout").read_to_string(&mut out).expect("read");
    let r: serde_json::Value = serde_json::from_str(out.trim()).expect("bench JSON");
    assert!(r["publisher_reconnects"].as_u64().expect("n") > 0, "{r}");
    assert!(r["subscriber_reconnects"].as_u64().expect("n") > 0, "{r}");
    let q1 = &r["qos"][1];
    assert!(q1["sent"].as_u64().expect("n") > 500, "{q1}");
    assert_eq!(q1["lost"].as_u64(), Some(0), "QoS 1 lost across kill -9: {q1}");
    assert_eq!(q1["received"], q1["expected"], "{q1}");
}

/// Publishers on one cluster node, subscribers on another: every message
/// crosses the cluster, and none is counted lost because publishing began
/// before the subscriptions' routes reached the publishers' node (the load
/// client waits for a probe to come through first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_bench_waits_for_routes_and_loses_nothing() {
    let n1 = common::cluster::start("b1", &[], None).await;
    let n2 = common::cluster::start("b2", &[n1.cluster], None).await;
    common::cluster::converged(&[&n1, &n2], 1).await;
    let mut a = args(n1.mqtt);
    a.sub_addr = Some(n2.mqtt);
    a.qos_mix = "0/50/50".into();
    a.id_prefix = "xn".into();
    let r = execute(&a).await.expect("bench runs");
    for q in [1, 2] {
        let x = &r.qos[q];
        assert!(x.sent > 0, "qos {q}: nothing sent");
        assert_eq!((x.received, x.lost, x.duplicated), (x.expected, 0, 0), "qos {q}: {x:?}");
    }
}

/// Subscribers on a broker that the publishers' broker does not forward to
/// (two separate brokers): the load client says the routes never spread,
/// instead of reporting every message as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_bench_between_unclustered_brokers_is_refused() {
    let (b1, b2) = (start(|_| {}).await, start(|_| {}).await);
    let mut a = args(b1.addr);
    a.sub_addr = Some(b2.addr);
    a.id_prefix = "xu".into();
    let e = execute(&a).await.expect_err("no route can reach b1");
    assert!(e.to_string().contains("did not reach the broker at"), "{e}");
}
