//! Forwards: the per-peer outbound queue (sending side) and deduplication
//! (receiving side).
//!
//! What the router queued for a peer stays until the peer acknowledged it
//! (QoS 1/2) or it was sent once (QoS 0), across reconnects, up to
//! `forward_queue` messages; beyond that new messages are dropped, counted
//! and logged once per episode. On a node with a data directory a QoS 1/2
//! forward is also written to the store before its publisher's
//! PUBACK/PUBREC goes out (the router waits for that commit as for a
//! persistent session's), deleted when the peer acked it, and queued again
//! when the node restarts, with the number it had.
//!
//! Message ids grow per node (across restarts too while forwards are on
//! disk), and a link sends its batches in queue order on one stream (several
//! in flight, answered in order), so the receiver keeps only the highest id
//! it has routed per (origin, origin's incarnation): a retried batch is
//! recognised as what it is. The receiver
//! keeps those marks in its store in the same commit as the messages it
//! queued for persistent sessions, so its restart does not forget them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use tokio::sync::Notify;

use super::Node;
use super::routes::RouteKey;
use crate::acks::Gate;
use crate::message::Message;
use crate::store::Op;

/// Next message id of this process (raised above what the store holds).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Ids restored from disk are below every new one.
pub fn ids_above(id: u64) {
    NEXT_ID.fetch_max(id + 1, Relaxed);
}

pub struct Queued {
    pub id: u64,
    /// The incarnation of this node that numbered it.
    pub inc: u64,
    pub msg: Arc<Message>,
    pub reliable: bool,
    /// Written to the store (deleted there when acked).
    pub durable: bool,
    /// The publisher's ack, held until the peer acked this forward or it
    /// is on disk.
    pub gate: Option<Arc<Gate>>,
    /// The peer's shared groups (filter, group) this message is for.
    pub shared: Vec<RouteKey>,
    /// Sent to the peer at least once (a failed batch, or restored from
    /// disk): the peer may have delivered it.
    pub tried: bool,
}

/// A shared-group forward taken back from a down peer's queue, to be
/// placed again among the groups' members that are up.
pub struct Reassigned {
    pub msg: Arc<Message>,
    pub shared: Vec<RouteKey>,
    /// The publisher's ack, when this forward still held it.
    pub gate: Option<Arc<Gate>>,
    /// The down peer may have delivered it (`Queued::tried`).
    pub tried: bool,
}

/// A forward's store record: origin incarnation, the message, then the
/// shared groups it is for (count, then filter and group per group).
pub fn encode(inc: u64, msg: &Message, shared: &[RouteKey]) -> Vec<u8> {
    let mut b = BytesMut::with_capacity(64 + msg.topic.len() + msg.payload.len());
    b.put_u64(inc);
    crate::store::record::encode_message(&mut b, msg);
    b.put_u32(shared.len() as u32);
    for (f, g) in shared {
        for s in [f, g] {
            b.put_u32(s.len() as u32);
            b.put_slice(s.as_bytes());
        }
    }
    b.to_vec()
}

/// A stored forward: (origin incarnation, message, shared groups).
pub type Decoded = (u64, Message, Vec<RouteKey>);

pub fn decode(raw: &[u8]) -> Result<Decoded, crate::codec::DecodeError> {
    use crate::codec::DecodeError::Malformed;
    let mut b = bytes::Bytes::copy_from_slice(raw);
    if b.len() < 8 {
        return Err(Malformed("stored forward too short"));
    }
    let inc = b.get_u64();
    let mut rd = crate::codec::Rd::new(b);
    let m = crate::store::record::decode_message(&mut rd)?;
    let mut shared = Vec::new();
    if !rd.is_empty() {
        let n = rd.u32()?;
        let mut s = || -> Result<String, crate::codec::DecodeError> {
            let len = rd.u32()? as usize;
            String::from_utf8(rd.take_bytes(len)?.to_vec()).map_err(|_| Malformed("stored group is not UTF-8"))
        };
        for _ in 0..n {
            shared.push((s()?, s()?));
        }
    }
    Ok((inc, m, shared))
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
    /// Set while the peer has been down longer than `down_keep`: the queue
    /// is held to `down_max_queued`.
    limited: AtomicBool,
    /// Set above the high-water mark (`congestion`), cleared below half of
    /// it: publishers wait on `drained` meanwhile.
    congested: AtomicBool,
    pub drained: Notify,
    /// Highest id considered by `spill` (restored ones are on disk).
    written: AtomicU64,
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
            limited: AtomicBool::new(false),
            written: AtomicU64::new(0),
            congested: AtomicBool::new(false),
            drained: Notify::new(),
            wake: Notify::new(),
            counters: PeerCounters::default(),
        }
    }

    /// Called by the router: never waits. On a node with a store a
    /// reliable forward holds `gate` (its publisher's ack) until the peer
    /// acked it or `spill` put it on disk. Beyond the bound new forwards
    /// are dropped (counted, logged once), except, on a node without a
    /// store, reliable ones whose publisher waits for them: they are queued
    /// and hold their publishers' acks until the peer acks them
    /// (backpressure: each publisher has at most its receive maximum
    /// unacknowledged, which bounds them). Below the bound a node without a
    /// store acknowledges at once (the forward lives in memory).
    /// Returns whether the queue is above its high-water mark: the
    /// publisher should wait (`Outlet::drained`) before it sends more.
    pub fn push(
        &self,
        node: &Node,
        peer: &str,
        msg: Arc<Message>,
        reliable: bool,
        shared: Vec<RouteKey>,
        gate: Option<&Arc<Gate>>,
    ) -> bool {
        let limited = self.limited.load(Relaxed);
        let cap = if limited { node.settings.down_max_queued } else { self.cap };
        let store = node.has_store();
        {
            let mut q = self.q.lock().expect("forward queue lock");
            let over = q.len() >= cap;
            let gate = gate.filter(|_| reliable && (store || (over && !limited)));
            if over && (store || gate.is_none()) {
                drop(q);
                self.counters.dropped.fetch_add(1, Relaxed);
                // The down-too-long episode was logged when it began.
                if !limited && !self.dropping.swap(true, Relaxed) {
                    node.metrics.drop_episode("queue_full");
                    tracing::warn!(
                        node = %node.settings.node_name,
                        %peer,
                        cap,
                        "forward queue full: dropping new messages for this peer until it drains \
                         (broker_cluster_forwards_total{{result=\"dropped\"}} counts them)"
                    );
                }
                return true;
            }
            let id = NEXT_ID.fetch_add(1, Relaxed);
            if let Some(g) = gate {
                g.hold();
            }
            q.push_back(Queued {
                id,
                inc: node.incarnation,
                msg,
                reliable,
                durable: false,
                shared,
                gate: gate.cloned(),
                tried: false,
            });
            if q.len() >= self.high_water() && !self.congested.load(Relaxed) {
                self.congested.store(true, Relaxed);
            }
        }
        self.wake.notify_one();
        self.congested.load(Relaxed)
    }

    /// Queued forwards beyond which publishers are made to wait: enough
    /// to keep the link's window full many times over, well below the
    /// bound where messages are dropped.
    fn high_water(&self) -> usize {
        (self.cap / 2).clamp(1, 16 * 1024)
    }

    pub fn congested(&self) -> bool {
        self.congested.load(Relaxed)
    }

    /// Writes to the store the reliable forwards queued before `before`
    /// that are not there yet, or all of them when more than `max_unwritten`
    /// wait: what the peer has not acked by then (it is slow, down or cut
    /// off) must survive this node. Returns the range of ids written; once
    /// that commit is durable, `on_disk` opens their gates. The writes are
    /// issued under the queue's lock, so an ack's delete cannot overtake
    /// them in the store's queue.
    pub fn spill(
        &self,
        node: &Node,
        peer: &Arc<str>,
        before: std::time::Instant,
        max_unwritten: usize,
    ) -> Option<(u64, u64)> {
        let mut q = self.q.lock().expect("forward queue lock");
        let written = self.written.load(Relaxed);
        let start = q.partition_point(|e| e.id <= written);
        let all = q.len() - start > max_unwritten;
        let mut range = None;
        for e in q.range_mut(start..) {
            if !all && e.msg.received_at > before {
                break;
            }
            if e.reliable && !e.durable {
                node.store_send(Op::PutForward(peer.clone(), e.id, encode(e.inc, &e.msg, &e.shared)));
                e.durable = true;
                range = Some((range.map_or(e.id, |(lo, _)| lo), e.id));
            }
            self.written.store(e.id, Relaxed);
        }
        range
    }

    /// The spill of `range` is durable: the publishers of those forwards
    /// still queued need not wait for the peer any longer.
    pub fn on_disk(&self, (lo, hi): (u64, u64)) {
        let gates: Vec<Arc<Gate>> = {
            let mut q = self.q.lock().expect("forward queue lock");
            let start = q.partition_point(|e| e.id < lo);
            q.range_mut(start..).take_while(|e| e.id <= hi).filter_map(|e| e.gate.take()).collect()
        };
        gates.iter().for_each(|g| g.open());
    }

    /// Queues forwards restored from the store (they were acknowledged to
    /// their publishers: kept whatever the bound).
    pub fn restore(&self, items: Vec<Queued>) {
        if let Some(top) = items.iter().map(|e| e.id).max() {
            self.written.fetch_max(top, Relaxed);
        }
        self.q.lock().expect("forward queue lock").extend(items);
    }

    pub fn len(&self) -> usize {
        self.q.lock().expect("forward queue lock").len()
    }

    /// The first `n` queued as (id, incarnation, message, shared groups),
    /// still in the queue until `acked`.
    #[cfg(test)]
    pub fn peek(&self, n: usize) -> Vec<(u64, u64, Arc<Message>, Vec<RouteKey>)> {
        self.peek_from(0, n, |e| (e.id, e.inc, e.msg.clone(), e.shared.clone()))
    }

    /// `f` of up to `n` queued entries after the first `skip` (those are in
    /// flight), still in the queue until `acked`.
    pub fn peek_from<T>(&self, skip: usize, n: usize, f: impl FnMut(&Queued) -> T) -> Vec<T> {
        let q = self.q.lock().expect("forward queue lock");
        q.range(skip.min(q.len())..).take(n).map(f).collect()
    }

    /// The peer took the first `n` (`each` sees them): opens their gates;
    /// returns the ids to delete from the store.
    pub fn acked(&self, n: usize, mut each: impl FnMut(&Queued)) -> Vec<u64> {
        let mut gates = Vec::new();
        let gone: Vec<u64> = {
            let mut q = self.q.lock().expect("forward queue lock");
            let n = n.min(q.len());
            let gone = q
                .drain(..n)
                .inspect(|e| each(e))
                .filter_map(|mut e| {
                    gates.extend(e.gate.take());
                    e.durable.then_some(e.id)
                })
                .collect();
            self.counters.acked.fetch_add(n as u64, Relaxed);
            if q.len() < self.cap / 2 && self.dropping.swap(false, Relaxed) {
                tracing::info!(queued = q.len(), "forward queue drained below half: accepting new messages again");
            }
            if q.len() < self.high_water() / 2 && self.congested.swap(false, Relaxed) {
                self.drained.notify_waiters();
            }
            gone
        };
        gates.iter().for_each(|g| g.open());
        gone
    }

    /// Sending the first `n` failed: QoS 0 among them is gone (at most
    /// once), the rest is retried.
    pub fn failed(&self, n: usize) {
        let mut q = self.q.lock().expect("forward queue lock");
        let mut i = 0;
        let mut kept = 0;
        q.retain_mut(|e| {
            i += 1;
            let keep = i > n || e.reliable;
            kept += usize::from(i <= n && keep);
            e.tried |= i <= n;
            keep
        });
        self.counters.retried.fetch_add(kept as u64, Relaxed);
        self.counters.dropped.fetch_add((n - kept) as u64, Relaxed);
    }

    /// The peer is down: the shared groups of its reliable forwards go back
    /// to the router to be placed on members that are up (`Reassigned`,
    /// with the publisher's ack each held). The forward itself stays, for
    /// the peer's plain subscriptions, naming no group any more; one on
    /// disk is written again so, naming none. Nothing is in flight (the
    /// link calls this between sessions).
    pub fn take_shared(&self, node: &Node, peer: &Arc<str>) -> Vec<Reassigned> {
        let mut q = self.q.lock().expect("forward queue lock");
        let mut out = Vec::new();
        for e in q.iter_mut().filter(|e| e.reliable && !e.shared.is_empty()) {
            let shared = std::mem::take(&mut e.shared);
            if e.durable {
                node.store_send(Op::PutForward(peer.clone(), e.id, encode(e.inc, &e.msg, &[])));
            }
            out.push(Reassigned { msg: e.msg.clone(), shared, gate: e.gate.take(), tried: e.tried });
        }
        out
    }

    /// Applies the down-peer limit: once the peer has been down for longer
    /// than `down_keep` the oldest `down_max_queued` forwards are kept and
    /// the rest dropped (logged once for the episode); lifted when it is
    /// back. Returns the store ids to delete.
    pub fn limit(&self, node: &Node, peer: &str, down_for: Option<Duration>) -> Vec<u64> {
        let s = &node.settings;
        match down_for {
            Some(d) if d > s.down_keep => {
                let mut q = self.q.lock().expect("forward queue lock");
                let first = !self.limited.swap(true, Relaxed);
                let over = q.len().saturating_sub(s.down_max_queued);
                let keep = q.len() - over;
                let gone: Vec<Queued> = q.drain(keep..).collect();
                drop(q);
                // Dropped (counted, logged): their publishers wait no more.
                gone.iter().filter_map(|e| e.gate.as_ref()).for_each(|g| g.open());
                self.counters.dropped.fetch_add(over as u64, Relaxed);
                if first {
                    node.metrics.drop_episode("peer_down_too_long");
                    tracing::warn!(
                        node = %s.node_name,
                        %peer,
                        down_secs = d.as_secs(),
                        keep_secs = s.down_keep.as_secs(),
                        kept = s.down_max_queued,
                        dropped_now = over,
                        "peer down longer than cluster_down_peer_keep_secs: keeping the oldest forwards up to \
                         cluster_down_peer_max_queued, dropping the rest and new ones beyond it until it is back"
                    );
                }
                gone.into_iter().filter(|e| e.durable).map(|e| e.id).collect()
            }
            None if self.limited.swap(false, Relaxed) => {
                tracing::info!(node = %s.node_name, %peer, "peer back: its forward queue takes up to forward_queue again");
                Vec::new()
            }
            _ => Vec::new(),
        }
    }
}

/// Highest message id routed per origin incarnation, for one origin. One
/// lock per origin, held while a batch is checked and handed to the router,
/// so that batches reach the router in id order and a retry racing the
/// original (a stale connection) is recognised.
#[derive(Default)]
pub struct Seen {
    /// (incarnation, highest id), most recently used last.
    marks: Vec<(u64, u64)>,
}

/// Incarnations remembered per origin (as in the store).
const SEEN_KEEP: usize = 8;

impl Seen {
    pub fn top(&self, inc: u64) -> u64 {
        self.marks.iter().find(|(i, _)| *i == inc).map_or(0, |(_, t)| *t)
    }

    pub fn set(&mut self, inc: u64, top: u64) {
        self.marks.retain(|(i, _)| *i != inc);
        self.marks.push((inc, top));
        if self.marks.len() > SEEN_KEEP {
            self.marks.remove(0);
        }
    }
}

pub type Origin = Arc<tokio::sync::Mutex<Seen>>;

#[derive(Default)]
pub struct Dedup {
    origins: Mutex<HashMap<String, Origin>>,
    pub duplicates: AtomicU64,
}

impl Dedup {
    pub fn origin(&self, name: &str) -> Origin {
        self.origins.lock().expect("dedup lock").entry(name.to_owned()).or_default().clone()
    }

    /// Marks restored from the store, before the service answers anyone.
    pub fn restore(&self, marks: Vec<(String, u64, u64)>) {
        let mut o = self.origins.lock().expect("dedup lock");
        for (origin, inc, top) in marks {
            let e = o.entry(origin).or_default();
            let mut seen = e.try_lock().expect("nobody holds a restored origin");
            seen.set(inc, top);
        }
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
            let reliable = *qos != QoS::AtMostOnce;
            q.q.lock().unwrap().push_back(Queued {
                id: i as u64,
                inc: 1,
                msg: msg(*qos),
                reliable,
                durable: false,
                shared: Vec::new(),
                gate: None,
                tried: false,
            });
            ids.push(i as u64);
        }
        q.failed(3);
        let left: Vec<u64> = q.peek(10).iter().map(|(id, ..)| *id).collect();
        assert_eq!(left, vec![0, 2, 3]);
        q.acked(2, |_| ());
        assert_eq!(q.peek(10).iter().map(|(id, ..)| *id).collect::<Vec<_>>(), vec![3]);
    }
}

#[cfg(test)]
mod record_tests {
    use super::*;

    #[test]
    fn forward_record_round_trips_with_its_incarnation() {
        let m = Message {
            topic: "a/b".into(),
            payload: bytes::Bytes::from_static(b"xyz"),
            qos: crate::codec::QoS::ExactlyOnce,
            retain: false,
            props: crate::codec::Properties::default(),
            expires_at: None,
            publisher: Some(Arc::from("pub")),
            received_at: std::time::Instant::now(),
        };
        let shared = vec![("s/#".to_owned(), "g".to_owned())];
        let (inc, back, groups) = decode(&encode(42, &m, &shared)).expect("decodes");
        assert_eq!(groups, shared);
        assert_eq!((inc, back.topic.as_str(), &back.payload[..], back.qos), (42, "a/b", &b"xyz"[..], m.qos));
        assert_eq!(back.publisher.as_deref(), Some("pub"));
        assert!(decode(&[1, 2]).is_err());
    }

    #[test]
    fn seen_keeps_the_latest_incarnations() {
        let mut s = Seen::default();
        for inc in 1..=10 {
            s.set(inc, inc * 100);
        }
        assert_eq!((s.top(1), s.top(2), s.top(3), s.top(10)), (0, 0, 300, 1000));
        s.set(3, 301);
        assert_eq!(s.top(3), 301);
    }
}
