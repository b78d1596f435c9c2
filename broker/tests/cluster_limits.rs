//! Limits of what a node keeps for a peer that is away (real `broker`
//! processes): a full forward queue, and a peer down for longer than
//! `cluster_down_peer_keep_secs`. Drops are counted and logged once per
//! episode, never silent, and the node keeps serving its own clients.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use broker::client::publish;
use broker::codec::{Ack, Packet, QoS, Version};
use common::nodes::{ProcNode, converged, until};
use common::{connect, metric, subscribe};

/// Publishes QoS 1 messages numbered `from..to` one window at a time.
async fn publish_range(p: &mut broker::client::Client, from: u32, to: u32) {
    for k in from..to {
        p.wr.queue(&publish("lim/x", QoS::AtLeastOnce, (k + 1) as u16, k.to_be_bytes().to_vec()));
    }
    p.wr.flush().await.expect("publish");
    for _ in from..to {
        assert!(matches!(common::next(p).await, Packet::PubAck(a) if a.code == 0), "PUBACK");
    }
}

/// Receives until `n` numbered messages came, or nothing more comes for
/// `quiet`.
async fn receive(c: &mut broker::client::Client, n: usize, quiet: Duration) -> BTreeSet<u32> {
    let mut got = BTreeSet::new();
    while got.len() < n {
        match c.recv(quiet).await {
            Ok(Packet::Publish(m)) => {
                if m.qos == QoS::AtLeastOnce {
                    c.send(&Packet::PubAck(Ack::new(m.pid, 0))).await.expect("puback");
                }
                if m.payload.len() == 4 {
                    got.insert(u32::from_be_bytes(m.payload[..4].try_into().expect("4 bytes")));
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    got
}

/// n1 (with a persistent subscriber) is killed; n2 (queue of 200, 50 kept
/// past 1 s down) acknowledges 300 QoS 1 messages: 100 are dropped when the
/// queue is full, then 150 more once n1 has been down too long, each
/// episode one log line and one count; n2's own subscriber gets all 300.
/// Back, n1's session gets exactly the 50 oldest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_and_long_down_peer_drop_loudly_and_keep_the_oldest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut n1 = ProcNode::spawn(dir.path(), "n1", &[], &[]);
    let limits = [
        "--cluster-forward-queue",
        "200",
        "--cluster-down-peer-keep-secs",
        "1",
        "--cluster-down-peer-max-queued",
        "50",
    ];
    let n2 = ProcNode::spawn(dir.path(), "n2", &[n1.cluster], &limits);
    {
        let mut far = connect(n1.mqtt, Version::V311, "far", false).await;
        subscribe(&mut far, "lim/#", QoS::AtLeastOnce).await;
    }
    let mut near = connect(n2.mqtt, Version::V5, "near", true).await;
    subscribe(&mut near, "lim/#", QoS::AtLeastOnce).await;
    converged(&[&n1, &n2], Duration::from_secs(20));
    n1.kill9();

    let mut p = connect(n2.mqtt, Version::V5, "pub", true).await;
    publish_range(&mut p, 0, 300).await;
    let near_got = receive(&mut near, 300, Duration::from_secs(5)).await;
    assert_eq!(near_got.len(), 300, "n2's own subscriber is served while n1's queue is full");
    let m = n2.metrics();
    let dropped = "broker_cluster_forwards_total{node=\"n2\",peer=\"n1\",result=\"dropped\"}";
    let episodes = |m: &str, r: &str| {
        metric(m, &format!("broker_cluster_forward_drop_episodes_total{{node=\"n2\",reason=\"{r}\"}}"))
    };
    assert_eq!(metric(&m, dropped), 100.0, "300 acknowledged into a queue of 200");
    assert_eq!(episodes(&m, "queue_full"), 1.0);
    assert_eq!(n2.log_lines("forward queue full"), 1, "{}", n2.log_text());

    // Down for longer than 1 s (after the 1.5 s it takes to call it down):
    // the oldest 50 stay.
    until(Duration::from_secs(15), "n2 never cut n1's queue to 50", || {
        n2.member("n1").is_some_and(|m| m["forward_queue"] == 50)
    });
    let m = n2.metrics();
    assert_eq!(metric(&m, dropped), 250.0);
    assert_eq!(episodes(&m, "peer_down_too_long"), 1.0);
    assert_eq!(n2.member("n1").expect("n1")["forwards_dropped"], 250);
    publish_range(&mut p, 300, 310).await;
    assert_eq!(receive(&mut near, 10, Duration::from_secs(5)).await.len(), 10);
    // A few more link rounds: still one line per episode.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(metric(&n2.metrics(), dropped), 260.0, "new messages beyond the bound are dropped");
    assert_eq!(n2.log_lines("peer down longer than cluster_down_peer_keep_secs"), 1, "{}", n2.log_text());
    assert_eq!(n2.log_lines("forward queue full"), 1, "{}", n2.log_text());

    n1.start();
    let mut far = connect(n1.mqtt, Version::V311, "far", false).await;
    // The 50 kept arrive once n2's link is back (its backoff is up to 2 s);
    // then a quiet second shows that nothing else comes.
    let mut got = receive(&mut far, 50, Duration::from_secs(15)).await;
    got.extend(receive(&mut far, 1, Duration::from_secs(1)).await);
    assert_eq!(got, (0..50).collect::<BTreeSet<u32>>(), "n1's session gets the 50 oldest, nothing else");
    until(Duration::from_secs(10), "n2 never lifted the limit once n1 was back", || {
        n2.log_lines("peer back: its forward queue") == 1
    });
}
