//! This node's route table as peers see it: (filter, share group) -> the
//! highest QoS any local subscription was granted, with a version that grows
//! at every change and a log of recent changes, so that a peer that holds
//! version `b` gets only what changed since `b` (a delta), and a peer whose
//! `b` is older than the log (or from before a restart) gets the whole table.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::Node;

/// A route's identity: topic filter and share group ("" when not shared).
pub type RouteKey = (String, String);

/// What the router reports about local subscriptions.
#[derive(Debug)]
pub enum RouteEvent {
    Added(RouteKey, u8),
    Removed(RouteKey, u8),
}

/// Changes kept for deltas; a peer further behind gets the full table.
const LOG: usize = 4096;

#[derive(Default)]
struct Table {
    version: u64,
    /// Subscriptions per QoS for each route: its max QoS is the highest
    /// non-zero count.
    counts: HashMap<RouteKey, [u32; 3]>,
    routes: BTreeMap<RouteKey, u8>,
    /// (version, route, new max QoS or None when removed).
    log: VecDeque<(u64, RouteKey, Option<u8>)>,
}

#[derive(Default)]
pub struct LocalRoutes {
    table: Mutex<Table>,
}

/// What to send a peer that holds `base`.
pub struct Sync {
    pub full: bool,
    pub base: u64,
    pub version: u64,
    pub upserts: Vec<(RouteKey, u8)>,
    pub removed: Vec<RouteKey>,
}

impl LocalRoutes {
    pub fn version(&self) -> u64 {
        self.table.lock().expect("routes lock").version
    }

    pub fn len(&self) -> usize {
        self.table.lock().expect("routes lock").routes.len()
    }

    /// Applies one event; true when the table changed.
    fn apply(&self, e: RouteEvent) -> bool {
        let mut t = self.table.lock().expect("routes lock");
        let (key, qos, add) = match e {
            RouteEvent::Added(k, q) => (k, q, true),
            RouteEvent::Removed(k, q) => (k, q, false),
        };
        let c = t.counts.entry(key.clone()).or_default();
        let q = usize::from(qos.min(2));
        if add {
            c[q] += 1;
        } else {
            c[q] = c[q].saturating_sub(1);
        }
        let max = c.iter().rposition(|n| *n > 0).map(|i| i as u8);
        if max.is_none() {
            t.counts.remove(&key);
        }
        let now = t.routes.get(&key).copied();
        if now == max {
            return false;
        }
        match max {
            Some(m) => t.routes.insert(key.clone(), m),
            None => t.routes.remove(&key),
        };
        t.version += 1;
        let v = t.version;
        t.log.push_back((v, key, max));
        if t.log.len() > LOG {
            t.log.pop_front();
        }
        true
    }

    /// What brings a peer holding `base` (u64::MAX: unknown) up to date.
    pub fn sync_from(&self, base: u64) -> Sync {
        let t = self.table.lock().expect("routes lock");
        let oldest = t.log.front().map_or(t.version + 1, |(v, _, _)| *v);
        // A delta needs every change after `base` in the log.
        if base <= t.version && base + 1 >= oldest {
            let mut last: BTreeMap<&RouteKey, Option<u8>> = BTreeMap::new();
            for (v, k, q) in &t.log {
                if *v > base {
                    last.insert(k, *q);
                }
            }
            let mut s = Sync { full: false, base, version: t.version, upserts: Vec::new(), removed: Vec::new() };
            for (k, q) in last {
                match q {
                    Some(q) => s.upserts.push((k.clone(), q)),
                    None => s.removed.push(k.clone()),
                }
            }
            return s;
        }
        Sync {
            full: true,
            base: 0,
            version: t.version,
            upserts: t.routes.iter().map(|(k, q)| (k.clone(), *q)).collect(),
            removed: Vec::new(),
        }
    }
}

/// Applies the router's events and wakes every link when the table moved.
pub async fn collect(node: Arc<Node>, mut events: mpsc::UnboundedReceiver<RouteEvent>) {
    let mut buf = Vec::with_capacity(256);
    while events.recv_many(&mut buf, 256).await > 0 {
        let mut changed = false;
        for e in buf.drain(..) {
            changed |= node.routes.apply(e);
        }
        if changed {
            for p in node.members.all() {
                p.queue.wake.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(f: &str) -> RouteKey {
        (f.to_owned(), String::new())
    }

    /// Two subscriptions of one filter are one route at the higher QoS;
    /// deltas carry what changed since a version, an unknown or too old
    /// base gets the full table.
    #[test]
    fn versions_deltas_and_full() {
        let r = LocalRoutes::default();
        assert!(r.apply(RouteEvent::Added(key("a/#"), 0)));
        assert!(r.apply(RouteEvent::Added(key("a/#"), 1)));
        assert!(!r.apply(RouteEvent::Added(key("a/#"), 1)));
        assert!(r.apply(RouteEvent::Added(key("b"), 2)));
        assert_eq!(r.version(), 3);
        let d = r.sync_from(1);
        assert!(!d.full);
        assert_eq!(d.upserts, vec![(key("a/#"), 1), (key("b"), 2)]);
        assert!(r.apply(RouteEvent::Removed(key("b"), 2)));
        let d = r.sync_from(3);
        assert_eq!((d.full, d.removed.clone(), d.version), (false, vec![key("b")], 4));
        let f = r.sync_from(u64::MAX);
        assert!(f.full);
        assert_eq!(f.upserts, vec![(key("a/#"), 1)]);
        for i in 0..LOG + 10 {
            r.apply(RouteEvent::Added(key(&format!("t/{i}")), 1));
        }
        assert!(r.sync_from(4).full, "a base older than the log gets the full table");
    }
}
