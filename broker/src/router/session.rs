//! One session's delivery state: subscriptions, outgoing QoS 1/2 messages in
//! flight and queued, incoming QoS 2 packet ids awaiting PUBREL.
//!
//! Outgoing packet ids are a function of the per-session sequence number
//! (`pid_of`), so they need not be stored: after a restart the broker resends
//! a message with the same id it had, which is what lets a client recognise
//! a QoS 2 duplicate.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use super::subs::Sub;
use crate::codec::{Ack, Packet, QoS, Will, publish_size};
use crate::config::Config;
pub use crate::inbox::ConnHandle;
use crate::message::{Delivery, Outbound};
use crate::metrics::{DropReason, Metrics};
use crate::store::record::{Entry, SessionMeta, encode_entry, encode_meta};
use crate::store::{Op, StoreHandle};

/// What a session needs from the router while delivering.
pub struct Ctx<'a> {
    pub cfg: &'a Config,
    pub metrics: &'a Metrics,
    pub store: Option<&'a StoreHandle>,
}

pub fn pid_of(seq: u64) -> u16 {
    (seq % 65_535) as u16 + 1
}

pub struct Session {
    pub id: Arc<str>,
    pub conn: Option<ConnHandle>,
    /// Session expiry interval in seconds; u32::MAX never expires.
    pub expiry: u32,
    pub v5: bool,
    pub subs: HashMap<String, Sub>,
    /// In flight by packet id, with the sequence number each id came from.
    /// `pump` never lets two messages in flight share an id, so one map
    /// answers a PUBACK (a map from ids to sequence numbers beside a
    /// `BTreeMap` by sequence number cost about 300 instructions more per
    /// QoS 1 delivery, callgrind).
    inflight: HashMap<u16, (u64, Entry)>,
    queue: VecDeque<(u64, Entry, bool)>,
    next_seq: u64,
    pub incoming_qos2: HashSet<u16>,
    pub will: Option<Will>,
    pub disconnected_at: Option<Instant>,
    /// Whether the store holds this session.
    pub stored: bool,
}

impl Session {
    pub fn new(id: Arc<str>) -> Session {
        Session {
            id,
            conn: None,
            expiry: 0,
            v5: false,
            subs: HashMap::new(),
            inflight: HashMap::new(),
            queue: VecDeque::new(),
            next_seq: 0,
            incoming_qos2: HashSet::new(),
            will: None,
            disconnected_at: None,
            stored: false,
        }
    }

    /// Rebuilds a session from the store; every message is resent with DUP.
    pub fn restore(id: Arc<str>, meta: SessionMeta, mut entries: Vec<(u64, Entry)>, in_qos2: Vec<u16>) -> Session {
        let mut s = Session::new(id);
        s.expiry = meta.expiry;
        s.v5 = meta.v5;
        s.subs = meta.subs.into_iter().collect();
        s.stored = true;
        s.disconnected_at = Some(Instant::now());
        entries.sort_by_key(|(seq, _)| *seq);
        s.next_seq = entries.last().map_or(0, |(seq, _)| seq + 1);
        for (seq, e) in entries {
            if e.released {
                s.inflight.insert(pid_of(seq), (seq, e));
            } else {
                s.queue.push_back((seq, e, true));
            }
        }
        s.incoming_qos2 = in_qos2.into_iter().collect();
        s
    }

    pub fn persistent(&self) -> bool {
        self.expiry > 0
    }

    pub fn conn_is(&self, id: u64) -> bool {
        self.conn.as_ref().is_some_and(|c| c.id == id)
    }

    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    pub fn queued_len(&self) -> usize {
        self.queue.len()
    }

    pub fn meta(&self) -> SessionMeta {
        SessionMeta { expiry: self.expiry, v5: self.v5, subs: self.subs.iter().map(|(f, s)| (f.clone(), *s)).collect() }
    }

    /// Everything a restart would restore, for another node taking the
    /// session over.
    pub fn export(&self) -> crate::inbox::MovedSession {
        let mut entries: Vec<(u64, Entry, bool)> =
            self.inflight.values().map(|(seq, e)| (*seq, e.clone(), true)).collect();
        entries.extend(self.queue.iter().map(|(seq, e, dup)| (*seq, e.clone(), *dup)));
        entries.sort_by_key(|(seq, _, _)| *seq);
        crate::inbox::MovedSession {
            meta: Some(self.meta()),
            entries,
            incoming_qos2: self.incoming_qos2.iter().copied().collect(),
            next_seq: self.next_seq,
        }
    }

    /// A session taken over from another node: its subscriptions, its
    /// messages with their sequence numbers (so packet ids stay), its
    /// incoming QoS 2 ids; written to the store when persistent.
    pub fn import(&mut self, ctx: &Ctx, m: crate::inbox::MovedSession) {
        if let Some(meta) = m.meta {
            self.subs = meta.subs.into_iter().collect();
            self.v5 = meta.v5;
        }
        self.inflight.clear();
        self.queue.clear();
        self.next_seq = m.next_seq;
        for (seq, e, sent) in m.entries {
            self.next_seq = self.next_seq.max(seq + 1);
            if let Some(store) = ctx.store
                && self.persistent()
            {
                store.send(Op::PutEntry(self.id.clone(), seq, encode_entry(&e)));
            }
            if e.released {
                self.inflight.insert(pid_of(seq), (seq, e));
            } else {
                self.queue.push_back((seq, e, sent));
            }
        }
        self.incoming_qos2 = m.incoming_qos2.into_iter().collect();
        if let Some(store) = ctx.store
            && self.persistent()
        {
            for pid in &self.incoming_qos2 {
                store.send(Op::PutInQos2(self.id.clone(), *pid));
            }
        }
    }

    /// Merges the session another node held for the same client (both
    /// sides of a partition served it): its subscriptions this one lacks
    /// are added (and returned, for the trie), its messages not yet
    /// received by the client are queued behind this session's, with new
    /// sequence numbers (a QoS 2 message the client already has, PUBREL
    /// pending, is not sent again).
    pub fn absorb(&mut self, ctx: &Ctx, m: crate::inbox::MovedSession) -> Vec<(String, Sub)> {
        let mut added = Vec::new();
        for (f, sub) in m.meta.map(|meta| meta.subs).unwrap_or_default() {
            if !self.subs.contains_key(&f) {
                self.subs.insert(f.clone(), sub);
                added.push((f, sub));
            }
        }
        // Queued only: the caller's CONNACK goes out before any of them.
        for (_, e, _) in m.entries {
            if e.released || self.queue.len() + self.inflight.len() >= ctx.cfg.max_queued {
                continue;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            if let Some(store) = ctx.store
                && self.persistent()
            {
                store.send(Op::PutEntry(self.id.clone(), seq, encode_entry(&e)));
            }
            self.queue.push_back((seq, e, false));
        }
        added
    }

    /// Writes the session record if the session is persistent and a store exists.
    pub fn save(&mut self, ctx: &Ctx) {
        if let Some(store) = ctx.store
            && self.persistent()
        {
            store.send(Op::PutSession(self.id.clone(), encode_meta(&self.meta())));
            self.stored = true;
        }
    }

    /// Queues a message for this session and sends what the window allows.
    /// Returns whether a store write was issued (the publisher's ack must
    /// then wait for the commit).
    pub fn deliver(&mut self, ctx: &Ctx, e: Entry) -> bool {
        if e.msg.expired_now() {
            ctx.metrics.dropped(DropReason::Expired, e.qos as u8);
            return false;
        }
        if e.qos == QoS::AtMostOnce {
            let Some(c) = &self.conn else {
                ctx.metrics.dropped(DropReason::OfflineQos0, 0);
                return false;
            };
            if c.qos0_pending.load(Relaxed) >= ctx.cfg.max_qos0_pending {
                ctx.metrics.dropped(DropReason::SlowConsumer, 0);
                return false;
            }
            if !fits(c, &e) {
                ctx.metrics.dropped(DropReason::PacketTooLarge, 0);
                return false;
            }
            c.qos0_pending.fetch_add(1, Relaxed);
            let _ = c.tx.send(Outbound::Deliver(Delivery {
                msg: e.msg,
                qos: QoS::AtMostOnce,
                pid: 0,
                dup: false,
                retain: e.retain,
                sub_ids: e.sub_ids,
            }));
            return false;
        }
        if self.queue.len() + self.inflight.len() >= ctx.cfg.max_queued {
            ctx.metrics.dropped(DropReason::QueueFull, e.qos as u8);
            return false;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut persisted = false;
        if let Some(store) = ctx.store
            && self.persistent()
        {
            store.send(Op::PutEntry(self.id.clone(), seq, encode_entry(&e)));
            persisted = true;
        }
        self.queue.push_back((seq, e, false));
        self.pump(ctx);
        persisted
    }

    fn forget(&mut self, ctx: &Ctx, seq: u64) {
        if let Some(store) = ctx.store
            && self.stored
        {
            store.send(Op::DelEntry(self.id.clone(), seq));
        }
    }

    /// Moves queued messages into flight while the client's window allows.
    pub fn pump(&mut self, ctx: &Ctx) {
        let Some(c) = self.conn.clone() else { return };
        while self.inflight.len() < usize::from(c.receive_max) {
            let Some((seq, _, _)) = self.queue.front() else {
                break;
            };
            let pid = pid_of(*seq);
            if self.inflight.contains_key(&pid) {
                // 65,535 messages behind a stuck one: wait for it.
                break;
            }
            let Some((seq, e, dup)) = self.queue.pop_front() else {
                break;
            };
            if e.msg.expired_now() {
                ctx.metrics.dropped(DropReason::Expired, e.qos as u8);
                self.forget(ctx, seq);
                continue;
            }
            if !fits(&c, &e) {
                ctx.metrics.dropped(DropReason::PacketTooLarge, e.qos as u8);
                self.forget(ctx, seq);
                continue;
            }
            let _ = c.tx.send(Outbound::Deliver(Delivery {
                msg: e.msg.clone(),
                qos: e.qos,
                pid,
                dup,
                retain: e.retain,
                sub_ids: e.sub_ids.clone(),
            }));
            self.inflight.insert(pid, (seq, e));
        }
    }

    /// After a reconnect: resend everything in flight (PUBLISH with DUP, or
    /// PUBREL), then continue with the queue.
    pub fn resume(&mut self, ctx: &Ctx) {
        let Some(c) = self.conn.clone() else { return };
        let mut resend: Vec<_> = self.inflight.iter().collect();
        resend.sort_unstable_by_key(|(_, (seq, _))| *seq);
        for (&pid, (_, e)) in resend {
            if e.released {
                let _ = c.tx.send(Outbound::packet(Packet::PubRel(Ack::new(pid, 0))));
            } else {
                let _ = c.tx.send(Outbound::Deliver(Delivery {
                    msg: e.msg.clone(),
                    qos: e.qos,
                    pid,
                    dup: true,
                    retain: e.retain,
                    sub_ids: e.sub_ids.clone(),
                }));
            }
        }
        self.pump(ctx);
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) from the client.
    pub fn complete(&mut self, ctx: &Ctx, pid: u16, qos: QoS) {
        let seq = match self.inflight.get(&pid) {
            Some(&(seq, ref e)) if e.qos == qos => seq,
            _ => return,
        };
        self.inflight.remove(&pid);
        self.forget(ctx, seq);
        self.pump(ctx);
    }

    /// PUBREC from the client: the message is delivered; answer PUBREL, once
    /// the released state is durable for a stored session.
    pub fn received(&mut self, ctx: &Ctx, pid: u16, code: u8, send_ack: &mut dyn FnMut(Packet, bool)) {
        let Some((seq, e)) = self.inflight.get_mut(&pid) else {
            send_ack(Packet::PubRel(Ack::new(pid, crate::codec::reason::PACKET_ID_NOT_FOUND)), false);
            return;
        };
        let seq = *seq;
        if e.qos != QoS::ExactlyOnce {
            return;
        }
        if code >= 0x80 {
            self.inflight.remove(&pid);
            self.forget(ctx, seq);
            self.pump(ctx);
            return;
        }
        let mut stored = false;
        if !e.released {
            e.released = true;
            if let Some(store) = ctx.store
                && self.stored
            {
                store.send(Op::PutEntry(self.id.clone(), seq, encode_entry(e)));
                stored = true;
            }
        }
        send_ack(Packet::PubRel(Ack::new(pid, 0)), stored);
    }

    /// Drops all message state (session ended or clean start).
    pub fn clear_messages(&mut self) {
        self.inflight.clear();
        self.queue.clear();
        self.incoming_qos2.clear();
    }
}

fn fits(c: &ConnHandle, e: &Entry) -> bool {
    // Subscription ids and expiry add a few bytes; 16 is a safe margin.
    let size = publish_size(c.version, &e.msg.topic, e.qos, &e.msg.props, e.msg.payload.len()) + 16;
    size <= c.max_packet as usize
}
