//! The cluster's operator surface over real HTTP, on real `broker`
//! processes: GET /cluster, /health when a peer is down, `broker cluster
//! status`, and the cluster's Prometheus series.

mod common;

use std::process::Command;
use std::time::Duration;

use broker::client::publish;
use broker::codec::{Packet, QoS, Version};
use common::nodes::{ProcNode, converged, until};
use common::{connect, http_get, metric, subscribe};

fn status_cmd(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["cluster", "status"])
        .args(args)
        .output()
        .expect("running broker cluster status");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Three nodes: /cluster shows each peer with its addresses, state, routes
/// and the version it holds; the status command prints the same as a table;
/// forwards show in the metrics; a killed peer makes /health degraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_document_status_command_health_and_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = ProcNode::spawn(dir.path(), "n1", &[], &[]);
    let n2 = ProcNode::spawn(dir.path(), "n2", &[n1.cluster], &[]);
    let mut n3 = ProcNode::spawn(dir.path(), "n3", &[n1.cluster], &[]);
    let mut sub = connect(n3.mqtt, Version::V5, "sub3", true).await;
    subscribe(&mut sub, "ops/a", QoS::AtLeastOnce).await;
    subscribe(&mut sub, "ops/b/#", QoS::AtMostOnce).await;
    let took = converged(&[&n1, &n2, &n3], Duration::from_secs(20));
    eprintln!("converged in {took:?}");

    let s = n1.cluster_status();
    assert_eq!(s["node"], "n1");
    assert!(s["incarnation"].as_u64().unwrap_or(0) > 0, "{s}");
    assert_eq!(s["degraded"], false);
    let names: Vec<&str> =
        s["members"].as_array().expect("members").iter().map(|m| m["name"].as_str().unwrap_or("")).collect();
    assert_eq!(names, ["n2", "n3"], "members of n1 are the other nodes");
    let m3 = n1.member("n3").expect("n3 in n1's members");
    let s3 = n3.cluster_status();
    assert_eq!(m3["cluster_addr"], n3.cluster.to_string());
    assert_eq!(m3["mqtt_addr"], n3.mqtt.to_string());
    assert_eq!(m3["state"], "up");
    assert_eq!((m3["routes"].as_u64(), s3["local_routes"].as_u64()), (Some(2), Some(2)), "n3's two routes, held by n1");
    assert_eq!(m3["route_version"], s3["route_version"]);
    assert_eq!(m3["forward_queue"], 0);
    assert_eq!(m3["forwards_dropped"], 0);
    let now_ms = broker::cluster::unix_ms();
    let resync = m3["last_resync_unix_ms"].as_u64().expect("last resync");
    assert!(resync > 0 && resync <= now_ms && now_ms - resync < 60_000, "last resync {resync}, now {now_ms}");
    let (code, health) = http_get(n1.http, "/health");
    assert_eq!((code, health.trim()), (200, "{\"node\":\"n1\",\"status\":\"ok\"}"));

    // QoS 1 from n1 to the subscriber on n3: counted as a forward to n3.
    let mut p = connect(n1.mqtt, Version::V5, "pub1", true).await;
    for i in 1..=20u16 {
        p.send(&publish("ops/a", QoS::AtLeastOnce, i, &b"x"[..])).await.expect("publish");
        assert!(matches!(common::next(&mut p).await, Packet::PubAck(_)));
    }
    let mut got = 0;
    while got < 20 {
        if let Packet::Publish(m) = common::next(&mut sub).await {
            sub.send(&Packet::PubAck(broker::codec::Ack::new(m.pid, 0))).await.expect("puback");
            got += 1;
        }
    }
    // n3's answer reaches n1 just after n3 delivered.
    let acked = "broker_cluster_forwards_total{node=\"n1\",peer=\"n3\",result=\"acked\"}";
    until(Duration::from_secs(5), "n1 never counted 20 forwards acked by n3", || metric(&n1.metrics(), acked) == 20.0);
    let m = n1.metrics();
    assert_eq!(metric(&m, "broker_cluster_forward_latency_seconds_count{node=\"n1\"}"), 20.0);
    assert_eq!(metric(&m, "broker_cluster_peers{node=\"n1\",state=\"up\"}"), 2.0);
    assert_eq!(metric(&m, "broker_cluster_routes{node=\"n1\",peer=\"n3\"}"), 2.0);
    assert_eq!(metric(&m, "broker_cluster_duplicates_dropped_total{node=\"n1\"}"), 0.0);
    assert_eq!(metric(&m, "broker_cluster_forward_drop_episodes_total{node=\"n1\",reason=\"queue_full\"}"), 0.0);

    // The status command: a table with a row per member, or the JSON.
    let (ok, out, err) = status_cmd(&["--http", &n1.http.to_string()]);
    assert!(ok, "status failed: {err}");
    eprintln!("{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("node n1 ") && lines[0].contains(": ok,"), "{out}");
    assert!(lines[1].starts_with("MEMBER") && lines[1].contains("QUEUED"), "{out}");
    let row3: Vec<&str> = lines.iter().find(|l| l.starts_with("n3 ")).expect("row of n3").split_whitespace().collect();
    assert_eq!(
        &row3[..6],
        ["n3", "up", &n3.cluster.to_string(), &n3.mqtt.to_string(), &s3["route_version"].to_string(), "2"]
    );
    let (ok, json, _) = status_cmd(&["--http", &n1.http.to_string(), "--json"]);
    assert!(ok);
    let j: serde_json::Value = serde_json::from_str(&json).expect("--json prints JSON");
    assert_eq!(j["node"], "n1");
    assert_eq!(j["members"][1]["name"], "n3");

    // A node killed: its peers are degraded, and say which peer is missing.
    n3.kill9();
    until(Duration::from_secs(10), "n1 never saw n3 down", || n1.member("n3").is_some_and(|m| m["state"] == "down"));
    let (code, health) = http_get(n1.http, "/health");
    let h: serde_json::Value = serde_json::from_str(&health).expect("health JSON");
    assert_eq!(code, 200, "a degraded node still serves");
    assert_eq!(h, serde_json::json!({"status": "degraded", "node": "n1", "peers_down": ["n3"]}));
    assert_eq!(n1.cluster_status()["degraded"], true);
    assert_eq!(metric(&n1.metrics(), "broker_cluster_peers{node=\"n1\",state=\"down\"}"), 1.0);
    let (ok, out, _) = status_cmd(&["--http", &n1.http.to_string()]);
    assert!(ok && out.lines().next().unwrap_or("").contains("DEGRADED"), "{out}");
    drop(n2);
}

/// The status command against nothing, or against a node that is not
/// clustered, says what is wrong and fails.
#[test]
fn status_command_errors_say_what_is_wrong() {
    let port = common::free_port();
    let (ok, _, err) = status_cmd(&["--http", &format!("127.0.0.1:{port}")]);
    assert!(!ok);
    assert!(err.contains("connecting to 127.0.0.1") && err.contains("--http-listen"), "{err}");
    let (ok, _, err) = status_cmd(&["--http", "no-port"]);
    assert!(!ok && err.contains("HOST:PORT"), "{err}");
    let dir = tempfile::tempdir().expect("tempdir");
    let single = common::BrokerProc::spawn(dir.path(), common::free_port(), &[]);
    let (code, body) = http_get(single.http, "/cluster");
    assert_eq!(code, 404);
    assert!(body.contains("not clustered"), "{body}");
    let (ok, _, err) = status_cmd(&["--http", &single.http.to_string()]);
    assert!(!ok && err.contains("404") && err.contains("not clustered"), "{err}");
    let (code, health) = http_get(single.http, "/health");
    assert_eq!((code, health.trim()), (200, "{\"node\":\"broker\",\"status\":\"ok\"}"));
}
