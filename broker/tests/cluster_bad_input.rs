//! Bad input to a cluster node (a real `broker` process): seeds that do not
//! exist or never answer, requests of another protocol revision, bytes that
//! are not the message a method takes, methods it does not have. Each is one
//! clear log line and a metric, and the node goes on serving.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker::client::publish;
use broker::codec::{Packet, QoS, Version};
use bytes::{Buf, BufMut};
use chaos_proto::broker::v1 as pb;
use common::nodes::{ProcNode, converged, until};
use common::{connect, metric, subscribe};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// A TCP listener that accepts connections and never answers (nor closes
/// them) until dropped.
struct BlackHole {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BlackHole {
    fn new() -> BlackHole {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        let addr = l.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let held = Mutex::new(Vec::new());
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => held.lock().expect("held").push(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        BlackHole { addr, stop, thread: Some(thread) }
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends and receives raw bytes as gRPC messages.
#[derive(Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

async fn raw_call(addr: SocketAddr, path: &'static str, body: Vec<u8>) -> tonic::Status {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the cluster port");
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.expect("ready");
    let pq = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    match g.unary(tonic::Request::new(body), pq, Raw).await {
        Ok(r) => panic!("{path} with bad input answered OK: {:?}", r.into_inner()),
        Err(s) => s,
    }
}

/// A node whose seeds are a closed port and a listener that never answers
/// serves its MQTT clients, says once per seed that it does not answer, and
/// counts the failures; requests of revision 99, garbage bodies, unknown
/// methods and strangers' forwards are refused with one log line each and
/// a metric; afterwards a real node still joins it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_seeds_and_bad_grpc_are_logged_counted_and_survived() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hole = BlackHole::new();
    let closed = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let n1 = ProcNode::spawn(dir.path(), "n1", &[closed, hole.addr], &[]);

    // Its own clients are served while the seeds fail.
    let mut s = connect(n1.mqtt, Version::V5, "local-sub", true).await;
    subscribe(&mut s, "bad/t", QoS::AtLeastOnce).await;
    let mut p = connect(n1.mqtt, Version::V5, "local-pub", true).await;
    p.send(&publish("bad/t", QoS::AtLeastOnce, 1, &b"hi"[..])).await.expect("publish");
    assert!(matches!(common::next(&mut p).await, Packet::PubAck(_)));
    assert!(matches!(common::next(&mut s).await, Packet::Publish(m) if &m.payload[..] == b"hi"));

    let failures = "broker_cluster_link_failures_total{node=\"n1\"}";
    until(Duration::from_secs(15), "join failures to both seeds never counted up to 6", || {
        metric(&n1.metrics(), failures) >= 6.0
    });
    for seed in [closed, hole.addr] {
        let lines: Vec<String> = n1
            .log_text()
            .lines()
            .filter(|l| l.contains("seed does not answer") && l.contains(&seed.to_string()))
            .map(str::to_owned)
            .collect();
        assert_eq!(lines.len(), 1, "one line for seed {seed} however often it is retried: {lines:#?}");
        eprintln!("{}", lines[0]);
    }
    let (code, health) = common::http_get(n1.http, "/health");
    assert_eq!((code, health.contains("\"ok\"")), (200, true), "no known peer is down: {health}");

    // A join speaking revision 99 of broker.v1.
    let mut c = pb::cluster_client::ClusterClient::connect(format!("http://{}", n1.cluster)).await.expect("connect");
    let node = pb::Node {
        name: "future".into(),
        cluster_addr: "127.0.0.1:1".into(),
        mqtt_addr: String::new(),
        incarnation: 1,
        protocol: 99,
    };
    let st = c.join(pb::JoinRequest { node: Some(node) }).await.expect_err("revision 99 refused");
    assert_eq!(st.code(), tonic::Code::FailedPrecondition);
    assert!(st.message().contains("revision 99") && st.message().contains("speaks 2"), "{}", st.message());
    // A node of revision 1 (before ForwardStream), retrying its join: each
    // try refused and counted, logged once.
    for _ in 0..3 {
        let old = pb::Node {
            name: "old".into(),
            cluster_addr: "127.0.0.1:1".into(),
            mqtt_addr: String::new(),
            incarnation: 1,
            protocol: 1,
        };
        let st = c.join(pb::JoinRequest { node: Some(old) }).await.expect_err("revision 1 refused");
        assert_eq!(st.code(), tonic::Code::FailedPrecondition);
        assert!(st.message().contains("revision 1 ") && st.message().contains("speaks 2"), "{}", st.message());
    }
    // Bytes that are not a JoinRequest (field 1 must be a message, here a
    // truncated one), and a method this node does not have.
    let st = raw_call(n1.cluster, "/broker.v1.Cluster/Join", vec![0x0a, 0x50, 0xff, 0xff]).await;
    assert_eq!(st.code(), tonic::Code::Internal, "{st:?}");
    let st = raw_call(n1.cluster, "/broker.v1.Cluster/Teleport", b"anything".to_vec()).await;
    assert_eq!(st.code(), tonic::Code::Unimplemented, "{st:?}");
    // A forward from a node that never joined.
    let fwd = pb::ForwardRequest { from: "stranger".into(), incarnation: 5, messages: Vec::new(), seq: 0 };
    let st = c.forward(fwd).await.expect_err("stranger refused");
    assert_eq!(st.code(), tonic::Code::FailedPrecondition);

    let m = n1.metrics();
    let rejected = |r: &str| metric(&m, &format!("broker_cluster_rejected_total{{node=\"n1\",reason=\"{r}\"}}"));
    assert_eq!(
        (rejected("protocol"), rejected("malformed"), rejected("unknown_peer")),
        (4.0, 2.0, 1.0),
        "refusals counted by reason"
    );
    assert_eq!(n1.log_lines("malformed cluster request refused"), 2, "{}", n1.log_text());
    assert_eq!(n1.log_lines("revision 99"), 1, "{}", n1.log_text());
    assert_eq!(n1.log_lines("speaks protocol revision 1 "), 1, "{}", n1.log_text());

    // The node still serves: a real node joins it, and MQTT works.
    let n2 = ProcNode::spawn(dir.path(), "n2", &[n1.cluster], &[]);
    converged(&[&n1, &n2], Duration::from_secs(20));
    p.send(&publish("bad/t", QoS::AtLeastOnce, 2, &b"again"[..])).await.expect("publish");
    assert!(matches!(common::next(&mut p).await, Packet::PubAck(_)));
    assert!(matches!(common::next(&mut s).await, Packet::Publish(m) if &m.payload[..] == b"again"));
}
