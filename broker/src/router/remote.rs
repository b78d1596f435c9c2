//! The router's side of the cluster: peers' routes, publishes forwarded by
//! peers, and how shared groups are placed across nodes.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::Router;
use super::session::Session;
use super::subs::Sub;
use crate::codec::{QoS, reason};
use crate::inbox::MovedSession;
use crate::message::Outbound;
use crate::store::Op;

impl Router {
    /// Another node takes `client`'s session over. The connection here
    /// gets DISCONNECT 0x8E; its will goes out now when its delay is 0 or
    /// the new connection starts clean (the session ends), and is dropped
    /// otherwise (a new connection came within the delay, MQTT 5 3.1.2.5;
    /// a 3.1.1 will has no delay: always published, 3.1.2.5 of 3.1.1). The
    /// session leaves this node: returned (empty on a clean start), or
    /// None when there was none.
    pub(super) fn on_take_over(&mut self, client: &Arc<str>, clean_start: bool) -> Option<Box<MovedSession>> {
        let s = self.sessions.get_mut(client)?;
        let will = s.conn.take().and_then(|oc| {
            let _ = oc.tx.send(Outbound::Close(reason::SESSION_TAKEN_OVER));
            s.will.take()
        });
        let moved = if clean_start { MovedSession::default() } else { s.export() };
        if let Some(w) = will
            && (clean_start || w.props.will_delay.unwrap_or(0) == 0)
        {
            self.publish_will(client, w);
        }
        if !clean_start {
            // Resumed elsewhere within the delay: a waiting will is dropped.
            self.pending_wills.retain(|(_, c, _)| c != client);
        }
        self.end_session(client);
        tracing::info!(%client, clean_start, "session taken over by another node");
        Some(Box::new(moved))
    }

    /// A peer's routes: remote subscribers in the trie, keyed by the node.
    pub(super) fn on_remote_routes(&mut self, r: crate::inbox::RemoteRoutes) {
        let key: Arc<str> = Arc::from(format!("{}{}", crate::cluster::REMOTE_PREFIX, r.node));
        let held = self.remote.entry(key.clone()).or_default();
        let share = |g: &str| -> Option<String> { (!g.is_empty()).then(|| g.to_owned()) };
        if r.full {
            for (f, g) in held.drain() {
                self.subs.remove(&key, share(&g).as_deref(), &f);
            }
        }
        for (f, g) in r.removed {
            self.subs.remove(&key, share(&g).as_deref(), &f);
            held.remove(&(f, g));
        }
        for ((f, g), q) in r.upserts {
            let qos = QoS::from_u8(q).unwrap_or(QoS::ExactlyOnce);
            self.subs.insert(
                &key,
                share(&g).as_deref(),
                &f,
                Sub { opts: crate::codec::SubOptions::qos(qos), id: None },
            );
            held.insert((f, g));
        }
    }

    /// Publishes from a peer, for local sessions; `done` answers the peer's
    /// forward once they are there, behind the store's commit when a
    /// persistent session got one. The deduplication marks go to the store
    /// either way, but are waited for only with such entries: after a crash
    /// of this node only persistent sessions are still there, and one that
    /// got nothing from the batch gets it rightly from a retry; the marks
    /// and the entries reach the disk together, so a restart never keeps
    /// the one without the other (a duplicate, or a message taken for one).
    pub(super) fn on_forwarded(&mut self, f: crate::inbox::Forwarded) {
        let crate::inbox::Forwarded { origin, msgs, marks, done } = f;
        if let Some(st) = &self.store {
            st.hold();
        }
        let mut persisted = false;
        for m in msgs {
            self.metrics.received[m.msg.qos as usize].fetch_add(1, Relaxed);
            persisted |= self.route(Arc::new(m.msg), Origin::Peer { shared: &m.shared }, None).1;
        }
        match &self.store {
            Some(st) => {
                for (inc, top) in marks {
                    st.send(Op::PutDedup(origin.clone(), inc, top));
                }
                st.release();
                if persisted {
                    st.send(Op::Then(Box::new(move |durable| {
                        if durable {
                            let _ = done.send(());
                        }
                    })));
                } else {
                    let _ = done.send(());
                }
            }
            None => {
                let _ = done.send(());
            }
        }
    }
}

impl Router {
    /// Shared-group messages a down peer had not acked: each goes to one
    /// member of its groups again, preferring members that are up (the
    /// down node's only when no other is left). A publisher's ack that such
    /// a forward held is held by the new forward (or the local store write)
    /// instead.
    pub(super) fn on_reassign(&mut self, taken: Vec<crate::cluster::Reassigned>) {
        for r in taken {
            let (_, persisted, _) = self.route(r.msg, Origin::Reassigned { shared: &r.shared }, r.gate.as_ref());
            let Some(gate) = r.gate else { continue };
            match &self.store {
                Some(st) if persisted => st.send(Op::Then(Box::new(move |durable| {
                    if durable {
                        gate.open();
                    }
                }))),
                _ => gate.open(),
            }
        }
    }
}

/// Where a routed message comes from.
#[derive(Clone, Copy)]
pub enum Origin<'a> {
    /// Published here (a client, a will, `$SYS`).
    Local,
    /// Forwarded by its publishing node, which chose this node for the
    /// shared groups in `shared`.
    Peer { shared: &'a [(String, String)] },
    /// Published here earlier and taken back from a down peer: for the
    /// shared groups in `shared` only, on any node.
    Reassigned { shared: &'a [(String, String)] },
}

/// Shared subscriptions across the cluster: the publishing node chooses one
/// member of each group among all it knows, its own sessions and the nodes
/// with members (one entry per node), round robin, preferring connected
/// sessions and nodes that are up. A node it chose gets the group in the
/// forward and picks one of its local members; a forwarded message goes to
/// no other group there. So each message reaches one member cluster-wide.
pub(super) struct Place<'a> {
    pub sessions: &'a foldhash::HashMap<Arc<str>, Session>,
    pub cluster: Option<&'a crate::cluster::Outlet>,
    pub origin: Origin<'a>,
}

impl super::subs::Placement for Place<'_> {
    fn group(&self, filter: &str, group: &str) -> bool {
        match self.origin {
            Origin::Local => true,
            Origin::Peer { shared } | Origin::Reassigned { shared } => {
                shared.iter().any(|(f, g)| f == filter && g == group)
            }
        }
    }

    fn eligible(&self, member: &str) -> bool {
        !matches!(self.origin, Origin::Peer { .. }) || !member.starts_with(crate::cluster::REMOTE_PREFIX)
    }

    fn online(&self, member: &str) -> bool {
        if member.starts_with(crate::cluster::REMOTE_PREFIX) {
            return self.cluster.is_some_and(|c| c.peer_up(member));
        }
        self.sessions.get(member).is_some_and(|s| s.conn.is_some())
    }
}

/// A local subscription as a route event for the cluster.
pub(super) fn route_event(filter: &str, sub: &Sub, added: bool) -> crate::cluster::RouteEvent {
    let (share, f) = super::split_share(filter);
    let key = (f.to_owned(), share.unwrap_or_default().to_owned());
    let q = sub.opts.qos as u8;
    if added { crate::cluster::RouteEvent::Added(key, q) } else { crate::cluster::RouteEvent::Removed(key, q) }
}

impl Router {
    pub(super) fn route_event(&self, filter: &str, sub: &Sub, added: bool) {
        if let Some(c) = &self.cluster {
            c.route_event(route_event(filter, sub, added));
        }
    }
}
