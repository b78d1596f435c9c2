//! The router's reaction to each kind of request.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::remote::{Origin, Place, route_event};
use super::session::{ConnHandle, Session};
use super::subs::Sub;
use super::{Router, split_share};
use crate::acks::Gate;
use crate::codec::{
    Ack, ConnAck, Connect, Packet, Properties, Publish, QoS, SubAck, Subscribe, UnsubAck, Unsubscribe, Version, Will,
    reason,
};
use crate::message::{Message, Outbound, unix_now};
use crate::store::Op;
use crate::store::record::Entry;

impl Router {
    pub(super) fn on_connect(
        &mut self,
        conn: ConnHandle,
        c: Connect,
        mut connack: ConnAck,
        moved: Option<Box<crate::inbox::MovedSession>>,
    ) {
        let id: Arc<str> = Arc::from(c.client_id.as_str());
        let v5 = c.version == Version::V5;
        let expiry = if v5 {
            c.props.session_expiry.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            u32::MAX
        };
        // Resuming the session cancels a will still waiting for its delay;
        // a clean start ends the session, and `end_session` sends that will.
        if !c.clean_start {
            self.pending_wills.retain(|(_, client, _)| *client != id);
        }
        let mut present = false;
        if let Some(old) = self.sessions.get_mut(&id) {
            if let Some(oc) = old.conn.take() {
                let _ = oc.tx.send(Outbound::Close(reason::SESSION_TAKEN_OVER));
                if let Some(w) = old.will.take()
                    && (c.clean_start || w.props.will_delay.unwrap_or(0) == 0)
                {
                    self.publish_will(&id, w);
                }
            }
            if c.clean_start {
                self.end_session(&id);
            } else {
                present = true;
            }
        }
        let ctx_store = self.store.clone();
        let s = self.sessions.entry(id.clone()).or_insert_with(|| Session::new(id.clone()));
        let was_stored = s.stored;
        s.conn = Some(conn.clone());
        s.disconnected_at = None;
        s.expiry = expiry;
        s.v5 = v5;
        s.will = c.will;
        let ctx = super::session::Ctx { cfg: &self.cfg, metrics: &self.metrics, store: ctx_store.as_ref() };
        // A session another node handed over. When this node has one of
        // its own for the client (the two sides of a partition both served
        // it), the two are merged: subscriptions united, the other's
        // undelivered messages queued behind this one's.
        if let Some(m) = moved
            && !c.clean_start
            && m.meta.is_some()
        {
            let added = if present {
                s.absorb(&ctx, *m)
            } else {
                s.import(&ctx, *m);
                s.subs.iter().map(|(f, sub)| (f.clone(), *sub)).collect()
            };
            for (filter, sub) in &added {
                let (share, f) = split_share(filter);
                self.subs.insert(&id, share, f, *sub);
                if let Some(cl) = &self.cluster {
                    cl.route_event(route_event(filter, sub, true));
                }
            }
            present = true;
        }
        connack.session_present = present;
        let _ = conn.tx.send(Outbound::packet(Packet::ConnAck(connack)));
        if s.persistent() {
            s.save(&ctx);
        } else if was_stored {
            if let Some(st) = &ctx_store {
                st.send(Op::DelSession(id.clone()));
            }
            s.stored = false;
        }
        s.resume(&ctx);
    }

    pub(super) fn on_disconnected(&mut self, conn: u64, client: &Arc<str>, publish_will: bool, expiry: Option<u32>) {
        let Some(s) = self.sessions.get_mut(client) else {
            return;
        };
        if !s.conn_is(conn) {
            return;
        }
        s.conn = None;
        s.disconnected_at = Some(Instant::now());
        if let Some(e) = expiry
            && e != s.expiry
        {
            s.expiry = e;
            let ctx = super::session::Ctx { cfg: &self.cfg, metrics: &self.metrics, store: self.store.as_ref() };
            s.save(&ctx);
        }
        let will = s.will.take();
        let expiry = s.expiry;
        if let Some(w) = will
            && publish_will
        {
            let delay = w.props.will_delay.unwrap_or(0);
            if delay == 0 || expiry == 0 {
                self.publish_will(client, w);
            } else {
                let wait = delay.min(expiry);
                self.pending_wills.push((Instant::now() + Duration::from_secs(u64::from(wait)), client.clone(), w));
            }
        }
        if expiry == 0 {
            self.end_session(client);
        }
    }

    /// Removes a session, its subscriptions and its stored state; a will
    /// still waiting for its delay goes out now (MQTT 5 3.1.3.2.2).
    pub(super) fn end_session(&mut self, id: &Arc<str>) {
        let Some(mut s) = self.sessions.remove(id) else {
            return;
        };
        for (filter, sub) in &s.subs {
            let (share, f) = split_share(filter);
            self.subs.remove(id, share, f);
            if let Some(c) = &self.cluster {
                c.route_event(route_event(filter, sub, false));
            }
        }
        if s.stored
            && let Some(st) = &self.store
        {
            st.send(Op::DelSession(id.clone()));
        }
        s.clear_messages();
        if let Some(pos) = self.pending_wills.iter().position(|(_, c, _)| c == id) {
            let (_, c, w) = self.pending_wills.remove(pos);
            self.publish_will(&c, w);
        }
    }

    pub(super) fn publish_will(&mut self, client: &Arc<str>, w: Will) {
        let mut props = w.props;
        props.will_delay = None;
        let msg = Message {
            expires_at: props.message_expiry.map(|e| unix_now() + u64::from(e)),
            topic: w.topic,
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            props,
            publisher: Some(client.clone()),
            received_at: Instant::now(),
        };
        self.route(Arc::new(msg), Origin::Local, None);
    }

    /// Sends an ack to a connection, behind the store when it must wait for
    /// a commit, behind the cluster when `gate` (the message's forwards) is
    /// held, and behind earlier acks that still wait.
    fn send_ack(&self, conn: &ConnHandle, pkt: Packet, needs_store: bool) {
        self.send_ack_gated(conn, pkt, needs_store, None);
    }

    fn send_ack_gated(&self, conn: &ConnHandle, pkt: Packet, needs_store: bool, gate: Option<Arc<Gate>>) {
        let needs_store = needs_store && self.store.is_some();
        let gate = gate.filter(|g| g.held());
        let waiting = u32::from(needs_store) + u32::from(gate.is_some());
        let Some(seq) = conn.acks.push(&conn.tx, pkt, waiting) else {
            return;
        };
        if needs_store && let Some(st) = &self.store {
            let (tx, acks) = (conn.tx.clone(), conn.acks.clone());
            st.send(Op::Then(Box::new(move |durable| acks.done(&tx, seq, durable))));
        }
        if let Some(g) = gate {
            let (tx, acks) = (conn.tx.clone(), conn.acks.clone());
            g.bind(move || acks.done(&tx, seq, true));
        }
    }

    pub(super) fn on_publish(&mut self, conn: u64, client: &Arc<str>, p: Publish) {
        let Some(s) = self.sessions.get_mut(client) else {
            return;
        };
        let Some(c) = s.conn.clone().filter(|c| c.id == conn) else {
            return;
        };
        self.metrics.received[p.qos as usize].fetch_add(1, Relaxed);
        let v5 = c.version == Version::V5;
        let mut stored_in = false;
        // The packet id and the message's queue entries are one unit on disk.
        let atomic = p.qos == QoS::ExactlyOnce && s.persistent() && self.store.is_some();
        if p.qos == QoS::ExactlyOnce {
            if s.incoming_qos2.contains(&p.pid) {
                // A resend of a message we already have: acknowledge only.
                self.send_ack(&c, Packet::PubRec(Ack::new(p.pid, 0)), false);
                return;
            }
            if p.props.payload_format == Some(1) && std::str::from_utf8(&p.payload).is_err() {
                self.send_ack(&c, Packet::PubRec(Ack::new(p.pid, reason::PAYLOAD_FORMAT_INVALID)), false);
                return;
            }
            s.incoming_qos2.insert(p.pid);
            if s.persistent()
                && let Some(st) = &self.store
            {
                st.hold();
                st.send(Op::PutInQos2(client.clone(), p.pid));
                stored_in = true;
            }
        } else if p.qos == QoS::AtLeastOnce
            && p.props.payload_format == Some(1)
            && std::str::from_utf8(&p.payload).is_err()
        {
            self.send_ack(&c, Packet::PubAck(Ack::new(p.pid, reason::PAYLOAD_FORMAT_INVALID)), false);
            return;
        }
        let (qos, pid) = (p.qos, p.pid);
        let mut props = p.props;
        // Read first: a write through `Properties` allocates its values.
        if props.topic_alias.is_some() || !props.subscription_ids.is_empty() {
            props.topic_alias = None;
            props.subscription_ids.clear();
        }
        let msg = Message {
            expires_at: props.message_expiry.map(|e| unix_now() + u64::from(e)),
            topic: p.topic,
            payload: p.payload,
            qos,
            retain: p.retain,
            props,
            publisher: Some(client.clone()),
            received_at: Instant::now(),
        };
        // The forwards of a QoS 1/2 message hold its ack until their peers
        // acked them or they are on disk.
        let gate = (qos != QoS::AtMostOnce && self.cluster.is_some()).then(Gate::new);
        let (matched, persisted, congested) = self.route(Arc::new(msg), Origin::Local, gate.as_ref());
        if congested {
            c.throttle.store(true, Relaxed);
        }
        if atomic && let Some(st) = &self.store {
            st.release();
        }
        let code = if v5 && matched == 0 { reason::NO_MATCHING_SUBSCRIBERS } else { 0 };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send_ack_gated(&c, Packet::PubAck(Ack::new(pid, code)), persisted, gate),
            QoS::ExactlyOnce => {
                self.send_ack_gated(&c, Packet::PubRec(Ack::new(pid, code)), persisted || stored_in, gate)
            }
        }
    }

    pub(super) fn on_pubrel(&mut self, conn: u64, client: &Arc<str>, pid: u16) {
        let Some(s) = self.sessions.get_mut(client) else {
            return;
        };
        let Some(c) = s.conn.clone().filter(|c| c.id == conn) else {
            return;
        };
        let mut forgotten_on_disk = false;
        let code = if s.incoming_qos2.remove(&pid) {
            if s.stored
                && let Some(st) = &self.store
            {
                st.send(Op::DelInQos2(client.clone(), pid));
                forgotten_on_disk = true;
            }
            0
        } else {
            reason::PACKET_ID_NOT_FOUND
        };
        // After PUBCOMP the publisher may reuse the id at once: a broker that
        // still remembered it after a crash would take the new message for a
        // resend and drop it. So PUBCOMP waits for the id to be gone on disk.
        self.send_ack(&c, Packet::PubComp(Ack::new(pid, code)), forgotten_on_disk);
    }

    pub(super) fn on_complete(&mut self, conn: u64, client: &Arc<str>, pid: u16, qos: QoS) {
        let ctx = super::session::Ctx { cfg: &self.cfg, metrics: &self.metrics, store: self.store.as_ref() };
        let Some(s) = self.sessions.get_mut(client) else {
            return;
        };
        if s.conn_is(conn) {
            s.complete(&ctx, pid, qos);
        }
    }

    pub(super) fn on_pubrec(&mut self, conn: u64, client: &Arc<str>, pid: u16, code: u8) {
        let ctx = super::session::Ctx { cfg: &self.cfg, metrics: &self.metrics, store: self.store.as_ref() };
        let Some(s) = self.sessions.get_mut(client) else {
            return;
        };
        let Some(c) = s.conn.clone().filter(|c| c.id == conn) else {
            return;
        };
        let mut acks = Vec::new();
        s.received(&ctx, pid, code, &mut |pkt, stored| acks.push((pkt, stored)));
        for (pkt, stored) in acks {
            self.send_ack(&c, pkt, stored);
        }
    }

    pub(super) fn on_subscribe(&mut self, conn: u64, client: &Arc<str>, sub: Subscribe) {
        let Some(s) = self.sessions.get_mut(client) else {
            return;
        };
        let Some(c) = s.conn.clone().filter(|c| c.id == conn) else {
            return;
        };
        let v5 = c.version == Version::V5;
        let sub_id = sub.props.subscription_ids.first().copied();
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut retained_for: Vec<(String, Sub)> = Vec::new();
        for (filter, opts) in sub.filters {
            let shared = crate::topic::parse_shared(&filter);
            let (share, f) = match &shared {
                Some(Ok((g, f))) => (Some(*g), *f),
                Some(Err(())) => {
                    codes.push(reason::TOPIC_FILTER_INVALID);
                    continue;
                }
                None => (None, filter.as_str()),
            };
            if !crate::topic::valid_filter(f) {
                codes.push(reason::TOPIC_FILTER_INVALID);
                continue;
            }
            if share.is_some() && opts.no_local {
                // MQTT 5 3.8.3.1: a protocol error.
                let _ = c.tx.send(Outbound::Close(reason::PROTOCOL_ERROR));
                return;
            }
            let entry = Sub { opts, id: sub_id };
            let new = self.subs.insert(client, share, f, entry);
            let old = s.subs.insert(filter.clone(), entry);
            if let Some(cl) = &self.cluster {
                if let Some(old) = old {
                    cl.route_event(route_event(&filter, &old, false));
                }
                cl.route_event(route_event(&filter, &entry, true));
            }
            codes.push(opts.qos as u8);
            if share.is_none() && (opts.retain_handling == 0 || (opts.retain_handling == 1 && new)) {
                retained_for.push((f.to_owned(), entry));
            }
        }
        let _ =
            c.tx.send(Outbound::packet(Packet::SubAck(SubAck { pid: sub.pid, props: Properties::default(), codes })));
        let ctx = super::session::Ctx { cfg: &self.cfg, metrics: &self.metrics, store: self.store.as_ref() };
        s.save(&ctx);
        let _ = v5;
        for (f, entry) in retained_for {
            let mut matching: Vec<&Arc<Message>> =
                self.retained.values().filter(|m| crate::topic::matches(&f, &m.topic)).collect();
            matching.sort_by(|a, b| a.topic.cmp(&b.topic));
            for m in matching {
                let qos = entry.opts.qos.min(m.qos);
                s.deliver(
                    &ctx,
                    Entry {
                        msg: m.clone(),
                        qos,
                        retain: true,
                        released: false,
                        sub_ids: entry.id.into_iter().collect(),
                    },
                );
            }
        }
    }

    pub(super) fn on_unsubscribe(&mut self, conn: u64, client: &Arc<str>, u: Unsubscribe) {
        let Some(s) = self.sessions.get_mut(client) else {
            return;
        };
        let Some(c) = s.conn.clone().filter(|c| c.id == conn) else {
            return;
        };
        let mut codes = Vec::with_capacity(u.filters.len());
        for filter in &u.filters {
            let (share, f) = split_share(filter);
            let removed = s.subs.remove(filter);
            self.subs.remove(client, share, f);
            if let (Some(cl), Some(old)) = (&self.cluster, &removed) {
                cl.route_event(route_event(filter, old, false));
            }
            let removed = removed.is_some();
            codes.push(if removed { 0 } else { reason::NO_SUBSCRIPTION_EXISTED });
        }
        let _ =
            c.tx.send(Outbound::packet(Packet::UnsubAck(UnsubAck { pid: u.pid, props: Properties::default(), codes })));
        let ctx = super::session::Ctx { cfg: &self.cfg, metrics: &self.metrics, store: self.store.as_ref() };
        s.save(&ctx);
    }

    /// Delivers to every matching session and, for a publish made here
    /// (`Origin::Local`), queues it once for every other node with a
    /// matching route. A publish forwarded by a peer (`Origin::Peer`) went to
    /// every node already: it is for local sessions only, and for the shared
    /// groups the publishing node chose this node for.
    /// Reliable forwards hold `gate` (the publisher's ack) until their peer
    /// acked them or they are on disk. Returns the number of sessions and
    /// nodes, whether any store write was issued and whether a peer's
    /// forward queue is filling up (the publisher should slow down).
    pub(super) fn route(&mut self, msg: Arc<Message>, origin: Origin, gate: Option<&Arc<Gate>>) -> (usize, bool, bool) {
        let mut persisted = false;
        let mut congested = false;
        let local_only = matches!(origin, Origin::Peer { .. });
        // A forwarded message's retained write reaches this node through
        // the retained replication (`on_retained_sync`), not here.
        if msg.retain && matches!(origin, Origin::Local) {
            persisted |= self.set_retained(&msg) && msg.qos != QoS::AtMostOnce;
        }
        // Kept between publishes, so that routing one allocates no map.
        let mut targets = std::mem::take(&mut self.targets);
        {
            let place = Place { sessions: &self.sessions, cluster: self.cluster.as_ref(), origin };
            self.subs.matches(&msg.topic, &place, &mut |c, sub, group| {
                if sub.opts.no_local && msg.publisher.as_deref() == Some(&**c) {
                    return;
                }
                // Plain subscriptions had it the first time.
                if group.is_none() && matches!(origin, Origin::Reassigned { .. }) {
                    return;
                }
                let e = targets.entry(c.clone()).or_insert((QoS::AtMostOnce, false, Vec::new(), Vec::new()));
                e.0 = e.0.max(sub.opts.qos.min(msg.qos));
                e.1 |= sub.opts.retain_as_published;
                if let Some(id) = sub.id {
                    e.2.push(id);
                }
                if let Some((f, g)) = group
                    && c.starts_with(crate::cluster::REMOTE_PREFIX)
                {
                    e.3.push((f.to_owned(), g.to_owned()));
                }
            });
        }
        let n = targets.len();
        let ctx = super::session::Ctx { cfg: &self.cfg, metrics: &self.metrics, store: self.store.as_ref() };
        for (client, (qos, rap, sub_ids, shared)) in targets.drain() {
            if client.starts_with(crate::cluster::REMOTE_PREFIX) {
                // $SYS topics describe this node only.
                if !local_only
                    && !msg.topic.starts_with("$SYS")
                    && let Some(c) = &self.cluster
                {
                    congested |= c.forward(&client, &msg, qos != QoS::AtMostOnce, shared, gate);
                }
                continue;
            }
            if let Some(s) = self.sessions.get_mut(&client) {
                let retain = rap && msg.retain;
                persisted |= s.deliver(&ctx, Entry { msg: msg.clone(), qos, retain, released: false, sub_ids });
            }
        }
        self.targets = targets;
        (n, persisted, congested)
    }

    pub(super) fn publish_sys(&mut self) {
        let m = self.metrics.clone();
        let online = self.sessions.values().filter(|s| s.conn.is_some()).count();
        let sum = |a: &[std::sync::atomic::AtomicU64; 3]| a.iter().map(|x| x.load(Relaxed)).sum::<u64>();
        let stats = [
            ("$SYS/broker/version", format!("chaosd-broker {}", env!("CARGO_PKG_VERSION"))),
            ("$SYS/broker/uptime", format!("{} seconds", self.started.elapsed().as_secs())),
            ("$SYS/broker/clients/connected", online.to_string()),
            ("$SYS/broker/clients/total", self.sessions.len().to_string()),
            ("$SYS/broker/messages/received", sum(&m.received).to_string()),
            ("$SYS/broker/messages/sent", sum(&m.sent).to_string()),
            ("$SYS/broker/subscriptions/count", self.subs.len().to_string()),
            ("$SYS/broker/retained messages/count", self.retained.len().to_string()),
        ];
        for (topic, value) in stats {
            let msg = Message {
                topic: topic.to_owned(),
                payload: Bytes::from(value),
                qos: QoS::AtMostOnce,
                retain: true,
                props: Properties::default(),
                expires_at: None,
                publisher: None,
                received_at: Instant::now(),
            };
            self.route(Arc::new(msg), Origin::Local, None);
        }
    }
}
