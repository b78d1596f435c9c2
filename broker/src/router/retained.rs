//! Retained messages, and what the cluster needs to replicate them.
//!
//! Every write (set or clear) of a retained message gets a stamp (`Stamp`:
//! a hybrid logical clock in milliseconds, then the node's name). Nodes
//! replicate their retained sets to each other (`cluster::retained`) and
//! keep, per topic, the write with the higher stamp; a clear is kept as a
//! tombstone (its stamp without a message), so an older set that arrives
//! later does not bring the message back.

use std::sync::Arc;

use super::Router;
use crate::message::{Message, Stamp};
use crate::store::Op;
use crate::store::record::encode_retained;

/// Wall-clock milliseconds since the Unix epoch.
fn unix_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Router {
    /// A retained publish made on this node: stored, stamped and handed to
    /// the cluster. Returns whether a store write was issued.
    pub(super) fn set_retained(&mut self, msg: &Arc<Message>) -> bool {
        let kept = (!msg.payload.is_empty()).then(|| msg.clone());
        if msg.topic.starts_with("$SYS") {
            // Describes this node only: neither stored nor replicated.
            match kept {
                Some(m) => self.retained.insert(msg.topic.clone(), m),
                None => self.retained.remove(&msg.topic),
            };
            return false;
        }
        // Past the wall clock and every stamp seen: a node whose clock went
        // back still writes after what it has seen.
        self.hlc = (self.hlc + 1).max(unix_millis());
        let stamp = Stamp { millis: self.hlc, node: Arc::from(self.cfg.node_name.as_str()) };
        let wrote = self.apply_retained(&msg.topic, &stamp, kept.clone());
        if let Some(c) = &self.cluster {
            c.retained(msg.topic.clone(), stamp, kept);
        }
        wrote
    }

    /// Records a write of `topic`; returns whether a store write was issued.
    fn apply_retained(&mut self, topic: &str, stamp: &Stamp, msg: Option<Arc<Message>>) -> bool {
        self.retained_stamps.insert(topic.to_owned(), stamp.clone());
        let had = match &msg {
            Some(m) => self.retained.insert(topic.to_owned(), m.clone()).is_some(),
            None => self.retained.remove(topic).is_some(),
        };
        let Some(st) = &self.store else { return false };
        match msg {
            Some(m) => st.send(Op::PutRetained(topic.to_owned(), encode_retained(&m, stamp))),
            None if had => st.send(Op::DelRetained(topic.to_owned())),
            None => return false,
        }
        true
    }

    /// Retained writes replicated from a peer: each one whose stamp is
    /// higher than ours for its topic replaces what we hold (and is handed
    /// on, so that this node's set is complete for the next node to join).
    pub(super) fn on_retained_sync(&mut self, entries: Vec<(String, Stamp, Option<Message>)>) {
        for (topic, stamp, msg) in entries {
            self.hlc = self.hlc.max(stamp.millis);
            if self.retained_stamps.get(&topic).is_some_and(|s| *s >= stamp) {
                continue;
            }
            let msg = msg.map(Arc::new);
            self.apply_retained(&topic, &stamp, msg.clone());
            if let Some(c) = &self.cluster {
                c.retained(topic, stamp, msg);
            }
        }
    }

    /// Retained messages restored from the store, with their stamps.
    pub(super) fn restore_retained(&mut self, loaded: Vec<(Message, Stamp)>) {
        for (m, stamp) in loaded {
            self.hlc = self.hlc.max(stamp.millis);
            let m = Arc::new(m);
            if let Some(c) = &self.cluster {
                c.retained(m.topic.clone(), stamp.clone(), Some(m.clone()));
            }
            self.retained_stamps.insert(m.topic.clone(), stamp);
            self.retained.insert(m.topic.clone(), m);
        }
    }
}
