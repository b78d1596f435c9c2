//! Publisher and subscriber tasks of the load client. Both reconnect with
//! exponential backoff and keep counting when the broker goes away.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio_util::sync::CancellationToken;

use crate::client::{Client, WriteHalf, connect_packet};
use crate::codec::{Ack, Disconnect, Packet, Properties, Publish, QoS, SubOptions, Subscribe, Version};
use crate::record::{Recorder, now_ns};
use crate::spec::Reconnect;
use crate::stats::{self, SubStats};

#[derive(Clone)]
pub struct Common {
    pub addr: SocketAddr,
    pub version: Version,
    pub persistent: bool,
    pub reconnect: Reconnect,
    pub rec: Arc<Recorder>,
}

async fn open(c: &Common, id: &str) -> Option<(Client, bool)> {
    let mut cp = connect_packet(c.version, id, !c.persistent, 30);
    if c.persistent && c.version == Version::V5 {
        cp.props.session_expiry = Some(3600);
        cp.clean_start = false;
    }
    match tokio::time::timeout(Duration::from_secs(5), Client::connect(c.addr, cp)).await {
        Ok(Ok((cl, ack))) if ack.code == 0 => Some((cl, ack.session_present)),
        _ => {
            c.rec.connect_failures.fetch_add(1, Relaxed);
            None
        }
    }
}

/// Counts a live connection while it is held.
struct Connected<'a>(&'a AtomicI64);

impl<'a> Connected<'a> {
    fn new(c: &'a AtomicI64) -> Self {
        c.fetch_add(1, Relaxed);
        Connected(c)
    }
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

struct Backoff {
    next: Duration,
    policy: Reconnect,
}

impl Backoff {
    fn new(policy: Reconnect) -> Self {
        Backoff { next: policy.initial, policy }
    }
    async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.policy.max);
    }
    fn reset(&mut self) {
        self.next = self.policy.initial;
    }
}

pub struct PubCfg {
    pub common: Common,
    pub id: String,
    pub index: u32,
    pub topic: String,
    /// Messages per second; 0 sends as fast as the window allows.
    pub rate: f64,
    pub mix: [u32; 3],
    pub payload: usize,
    pub inflight: usize,
    /// Subscribers that receive each message.
    pub fanout: u64,
    /// Stop publishing (what is in flight is still completed).
    pub stop: CancellationToken,
    /// Stop completing what is in flight.
    pub give_up: CancellationToken,
}

#[derive(Default, Debug)]
pub struct PubResult {
    pub sent: [u64; 3],
    pub acked: [u64; 3],
    pub reconnects: u64,
}

struct Unacked {
    publish: Publish,
    released: bool,
}

fn pick_qos(mix: &[u32; 3], k: u64, index: u32) -> QoS {
    let r = ((k.wrapping_mul(37)).wrapping_add(u64::from(index) * 13) % 100) as u32;
    if r < mix[0] {
        QoS::AtMostOnce
    } else if r < mix[0] + mix[1] {
        QoS::AtLeastOnce
    } else {
        QoS::ExactlyOnce
    }
}

pub async fn publisher(cfg: PubCfg) -> PubResult {
    let mut res = PubResult::default();
    let mut seq = [0u64; 3];
    let mut k: u64 = 0;
    let mut unacked: HashMap<u16, Unacked> = HashMap::new();
    let mut next_pid: u16 = 0;
    let mut backoff = Backoff::new(cfg.common.reconnect);
    let interval = (cfg.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / cfg.rate));
    let mut next_due = Instant::now();
    let mut first = true;
    'conn: loop {
        if cfg.give_up.is_cancelled() || (cfg.stop.is_cancelled() && unacked.is_empty()) {
            break;
        }
        let Some((cl, present)) = open(&cfg.common, &cfg.id).await else {
            res.reconnects += 1;
            tokio::select! {
                _ = backoff.wait() => {}
                _ = cfg.give_up.cancelled() => break,
            }
            continue;
        };
        let _live = Connected::new(&cfg.common.rec.publishers_connected);
        // The offered load is a rate: time spent disconnected is not made
        // up for with a burst after the reconnect.
        next_due = next_due.max(Instant::now());
        if !first {
            res.reconnects += 1;
        }
        first = false;
        backoff.reset();
        let Client { mut rd, mut wr } = cl;
        if present {
            for u in unacked.values() {
                if u.released {
                    wr.queue(&Packet::PubRel(Ack::new(u.publish.pid, 0)));
                } else {
                    let mut p = u.publish.clone();
                    p.dup = true;
                    wr.queue(&Packet::Publish(p));
                }
            }
        } else {
            // A new session: what was in flight is gone (counted as lost
            // by the subscribers if it never arrived).
            unacked.clear();
        }
        if wr.flush().await.is_err() {
            continue 'conn;
        }
        loop {
            let now = Instant::now();
            let publishing = !cfg.stop.is_cancelled();
            if (!publishing && unacked.is_empty()) || cfg.give_up.is_cancelled() {
                let _ = wr.send(&Packet::Disconnect(Disconnect { code: 0, props: Properties::default() })).await;
                break 'conn;
            }
            let can_send = publishing && unacked.len() < cfg.inflight;
            let wait = match (can_send, interval) {
                (true, None) => Duration::ZERO,
                (true, Some(_)) => next_due.saturating_duration_since(now),
                (false, _) => Duration::from_millis(50),
            };
            tokio::select! {
                biased;
                r = rd.recv() => {
                    let Ok(pkt) = r else { continue 'conn };
                    handle_pub_ack(pkt, &mut unacked, &mut res, &mut wr, &cfg.common.rec);
                    while let Ok(Some(pkt)) = rd.try_next() {
                        handle_pub_ack(pkt, &mut unacked, &mut res, &mut wr, &cfg.common.rec);
                    }
                    if wr.flush().await.is_err() {
                        continue 'conn;
                    }
                }
                _ = async { if !wait.is_zero() { tokio::time::sleep(wait).await } } => {
                    if !can_send {
                        continue;
                    }
                    let mut n = 0;
                    while n < 64 && unacked.len() < cfg.inflight && !cfg.stop.is_cancelled() {
                        if let Some(iv) = interval {
                            if next_due > Instant::now() {
                                break;
                            }
                            next_due += iv;
                        }
                        let qos = pick_qos(&cfg.mix, k, cfg.index);
                        k += 1;
                        let q = qos as usize;
                        let mut payload = BytesMut::zeroed(cfg.payload.max(stats::HEADER));
                        let at = now_ns();
                        stats::encode_header(&mut payload, cfg.index, q as u8, seq[q], at);
                        seq[q] += 1;
                        let pid = if qos == QoS::AtMostOnce {
                            0
                        } else {
                            loop {
                                next_pid = next_pid.wrapping_add(1).max(1);
                                if !unacked.contains_key(&next_pid) {
                                    break next_pid;
                                }
                            }
                        };
                        let p = Publish {
                            dup: false,
                            qos,
                            retain: false,
                            topic: cfg.topic.clone(),
                            pid,
                            props: Properties::default(),
                            payload: payload.freeze(),
                        };
                        res.sent[q] += 1;
                        cfg.common.rec.sent(q, at, cfg.fanout);
                        if qos == QoS::AtMostOnce {
                            res.acked[0] += 1;
                            cfg.common.rec.acked(0);
                            wr.queue(&Packet::Publish(p));
                        } else {
                            wr.queue(&Packet::Publish(p.clone()));
                            unacked.insert(pid, Unacked { publish: p, released: false });
                        }
                        n += 1;
                    }
                    if wr.flush().await.is_err() {
                        continue 'conn;
                    }
                }
            }
        }
    }
    res
}

fn handle_pub_ack(
    pkt: Packet,
    unacked: &mut HashMap<u16, Unacked>,
    res: &mut PubResult,
    wr: &mut WriteHalf,
    rec: &Recorder,
) {
    match pkt {
        Packet::PubAck(a) if unacked.remove(&a.pid).is_some() => {
            res.acked[1] += 1;
            rec.acked(1);
        }
        Packet::PubRec(a) => {
            if let Some(u) = unacked.get_mut(&a.pid) {
                if a.code >= 0x80 {
                    unacked.remove(&a.pid);
                } else {
                    u.released = true;
                    wr.queue(&Packet::PubRel(Ack::new(a.pid, 0)));
                }
            }
        }
        Packet::PubComp(a) if unacked.remove(&a.pid).is_some() => {
            res.acked[2] += 1;
            rec.acked(2);
        }
        _ => {}
    }
}

pub struct SubCfg {
    pub common: Common,
    pub id: String,
    pub filter: String,
    pub stop: CancellationToken,
    /// Incremented once this subscriber's first SUBACK arrived.
    pub ready: Arc<AtomicUsize>,
    /// Set when a route probe (`PROBE`) reached this subscriber.
    pub probed: Arc<AtomicBool>,
}

/// Payload of a route probe: shorter than a measurement header, so it is
/// never counted as a message.
pub const PROBE: &[u8] = b"route-probe";

pub struct SubResult {
    pub reconnects: u64,
}

pub async fn subscriber(cfg: SubCfg) -> SubResult {
    let mut stats = SubStats::default();
    let mut reconnects = 0;
    let mut backoff = Backoff::new(cfg.common.reconnect);
    let mut first = true;
    'conn: while !cfg.stop.is_cancelled() {
        let Some((cl, _)) = open(&cfg.common, &cfg.id).await else {
            reconnects += 1;
            tokio::select! {
                _ = backoff.wait() => {}
                _ = cfg.stop.cancelled() => break,
            }
            continue;
        };
        if !first {
            reconnects += 1;
        }
        backoff.reset();
        let _live = Connected::new(&cfg.common.rec.subscribers_connected);
        let Client { mut rd, mut wr } = cl;
        let sub = Subscribe {
            pid: 1,
            props: Properties::default(),
            filters: vec![(cfg.filter.clone(), SubOptions::qos(QoS::ExactlyOnce))],
        };
        if wr.send(&Packet::Subscribe(sub)).await.is_err() {
            continue;
        }
        // QoS 2 packet ids received and not yet released (method B of 4.3.3).
        let mut pending: HashSet<u16> = HashSet::new();
        loop {
            let r = tokio::select! {
                r = rd.recv() => r,
                _ = cfg.stop.cancelled() => {
                    let _ = wr.send(&Packet::Disconnect(Disconnect { code: 0, props: Properties::default() })).await;
                    break 'conn;
                }
            };
            let Ok(pkt) = r else { continue 'conn };
            let mut next = Some(pkt);
            while let Some(pkt) = next {
                if let Packet::SubAck(_) = &pkt
                    && first
                {
                    first = false;
                    cfg.ready.fetch_add(1, Relaxed);
                }
                on_sub_packet(pkt, &mut stats, &mut pending, &mut wr, &cfg);
                next = rd.try_next().ok().flatten();
            }
            if wr.flush().await.is_err() {
                continue 'conn;
            }
        }
    }
    SubResult { reconnects }
}

fn on_sub_packet(pkt: Packet, stats: &mut SubStats, pending: &mut HashSet<u16>, wr: &mut WriteHalf, cfg: &SubCfg) {
    match pkt {
        Packet::Publish(p) => {
            let fresh = match p.qos {
                QoS::AtMostOnce => true,
                QoS::AtLeastOnce => {
                    wr.queue(&Packet::PubAck(Ack::new(p.pid, 0)));
                    true
                }
                QoS::ExactlyOnce => {
                    wr.queue(&Packet::PubRec(Ack::new(p.pid, 0)));
                    pending.insert(p.pid)
                }
            };
            if fresh && let Some((publisher, q, seq, ts)) = stats::decode_header(&p.payload) {
                let r = stats.record(publisher, q, seq);
                cfg.common.rec.received(usize::from(q), ts, now_ns(), r);
            } else if p.payload.as_ref() == PROBE {
                cfg.probed.store(true, Relaxed);
            }
        }
        Packet::PubRel(a) => {
            pending.remove(&a.pid);
            wr.queue(&Packet::PubComp(Ack::new(a.pid, 0)));
        }
        _ => {}
    }
}

/// Publishes `PROBE` at QoS 0 on `topics` through a broker at `c.addr`
/// every 100 ms until every flag in `probed` is set or `deadline`. In a
/// cluster a subscription reaches the other nodes a moment after its
/// SUBACK; publishing before that would count messages the cluster never
/// promised to deliver as lost. Returns whether every subscriber saw one.
pub async fn probe_routes(
    c: &Common,
    id: &str,
    topics: &[String],
    probed: &[Arc<AtomicBool>],
    deadline: Instant,
) -> bool {
    for f in probed {
        f.store(false, Relaxed);
    }
    let Some((mut cl, _)) = open(c, id).await else { return false };
    while Instant::now() < deadline {
        for t in topics {
            cl.wr.queue(&Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: t.clone(),
                pid: 0,
                props: Properties::default(),
                payload: bytes::Bytes::from_static(PROBE),
            }));
        }
        if cl.wr.flush().await.is_err() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if probed.iter().all(|f| f.load(Relaxed)) {
            let _ = cl.wr.send(&Packet::Disconnect(Disconnect { code: 0, props: Properties::default() })).await;
            return true;
        }
    }
    false
}
