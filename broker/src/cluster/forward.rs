//! Forwards: the per-peer outbound queue (sending side) and deduplication
//! (receiving side).
//!
//! The queue is in memory: what the router queued for a peer stays until the
//! peer acknowledged it (QoS 1/2) or it was sent once (QoS 0), across
//! reconnects, up to `forward_queue` messages; beyond that new messages are
//! dropped, counted and logged once per episode. Message ids grow per node
//! incarnation, and a link sends one batch at a time in queue order, so the
//! receiver can keep only the highest id it has routed per (origin,
//! incarnation): a retried batch is recognised as what it is.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::Node;
use crate::message::Message;

/// Next message id of this process (ids only need to grow per incarnation).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub struct Queued {
    pub id: u64,
    pub msg: Arc<Message>,
    pub reliable: bool,
}

#[derive(Default)]
pub struct PeerCounters {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub retried: AtomicU64,
    pub dropped: AtomicU64,
}

pub struct PeerQueue {
    q: Mutex<VecDeque<Queued>>,
    cap: usize,
    /// Set while dropping, so a full queue logs once per episode.
    dropping: AtomicBool,
    /// Wakes the peer's link: forwards queued or routes changed.
    pub wake: Notify,
    pub counters: PeerCounters,
}

impl PeerQueue {
    pub fn new(cap: usize) -> PeerQueue {
        PeerQueue {
            q: Mutex::new(VecDeque::new()),
            cap,
            dropping: AtomicBool::new(false),
            wake: Notify::new(),
            counters: PeerCounters::default(),
        }
    }

    /// Called by the router: never waits.
    pub fn push(&self, node: &Node, peer: &str, msg: Arc<Message>, reliable: bool) {
        {
            let mut q = self.q.lock().expect("forward queue lock");
            if q.len() >= self.cap {
                drop(q);
                self.counters.dropped.fetch_add(1, Relaxed);
                if !self.dropping.swap(true, Relaxed) {
                    node.metrics.drop_episode("queue_full");
                    tracing::warn!(
                        node = %node.settings.node_name,
                        %peer,
                        cap = self.cap,
                        "forward queue full: dropping new messages for this peer until it drains"
                    );
                }
                return;
            }
            q.push_back(Queued { id: NEXT_ID.fetch_add(1, Relaxed), msg, reliable });
        }
        self.wake.notify_one();
    }

    pub fn len(&self) -> usize {
        self.q.lock().expect("forward queue lock").len()
    }

    /// The first `n` queued, still in the queue until `acked`.
    pub fn peek(&self, n: usize) -> Vec<(u64, Arc<Message>)> {
        let q = self.q.lock().expect("forward queue lock");
        q.iter().take(n).map(|e| (e.id, e.msg.clone())).collect()
    }

    /// The peer took the first `n`.
    pub fn acked(&self, n: usize) {
        let mut q = self.q.lock().expect("forward queue lock");
        let n = n.min(q.len());
        q.drain(..n);
        self.counters.acked.fetch_add(n as u64, Relaxed);
        if q.len() < self.cap / 2 && self.dropping.swap(false, Relaxed) {
            tracing::info!(queued = q.len(), "forward queue drained below half: accepting new messages again");
        }
    }

    /// Sending the first `n` failed: QoS 0 among them is gone (at most
    /// once), the rest is retried.
    pub fn failed(&self, n: usize) {
        let mut q = self.q.lock().expect("forward queue lock");
        let mut i = 0;
        let mut kept = 0;
        q.retain(|e| {
            i += 1;
            let keep = i > n || e.reliable;
            kept += usize::from(i <= n && keep);
            keep
        });
        self.counters.retried.fetch_add(kept as u64, Relaxed);
        self.counters.dropped.fetch_add((n - kept) as u64, Relaxed);
    }
}

/// Highest message id routed per origin, for one incarnation of it. One lock
/// per origin, held while its batch is routed, so that a retry racing the
/// original (a stale connection) waits and is then recognised.
#[derive(Default)]
pub struct Dedup {
    origins: Mutex<HashMap<String, Arc<tokio::sync::Mutex<(u64, u64)>>>>,
    pub duplicates: AtomicU64,
}

impl Dedup {
    pub fn origin(&self, name: &str) -> Arc<tokio::sync::Mutex<(u64, u64)>> {
        self.origins.lock().expect("dedup lock").entry(name.to_owned()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Properties, QoS};

    fn msg(qos: QoS) -> Arc<Message> {
        Arc::new(Message {
            topic: "t".into(),
            payload: bytes::Bytes::new(),
            qos,
            retain: false,
            props: Properties::default(),
            expires_at: None,
            publisher: None,
            received_at: std::time::Instant::now(),
        })
    }

    /// A failed batch keeps its QoS 1 messages, in order, and loses its
    /// QoS 0 ones; an ack removes exactly what was sent.
    #[test]
    fn failed_batch_keeps_reliable_in_order() {
        let q = PeerQueue::new(10);
        let mut ids = Vec::new();
        for (i, qos) in [QoS::AtLeastOnce, QoS::AtMostOnce, QoS::AtLeastOnce, QoS::AtMostOnce].iter().enumerate() {
            q.q.lock().unwrap().push_back(Queued { id: i as u64, msg: msg(*qos), reliable: *qos != QoS::AtMostOnce });
            ids.push(i as u64);
        }
        q.failed(3);
        let left: Vec<u64> = q.peek(10).iter().map(|(id, _)| *id).collect();
        assert_eq!(left, vec![0, 2, 3]);
        q.acked(2);
        assert_eq!(q.peek(10).iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![3]);
    }
}
