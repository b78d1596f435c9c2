//! The retained messages this node holds, as its peers are sent them: every
//! write (set, or clear as a tombstone) with its stamp, numbered by a
//! version that grows at each change, so that a link sends a peer the whole
//! set once per link session and then only what changed since.
//!
//! The router decides which write wins (the higher stamp) and reports
//! every write it keeps, its own and its peers'; this table only mirrors
//! them for the links. A node therefore hands a newcomer the writes of
//! every node it heard from, not only its own.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::message::{Message, Stamp};

/// One retained write: its stamp, and the message (None: cleared).
pub type Write = (String, Stamp, Option<Arc<Message>>);

#[derive(Default)]
struct Inner {
    version: u64,
    /// Topic -> (version of its last change, stamp, message).
    entries: HashMap<String, (u64, Stamp, Option<Arc<Message>>)>,
    /// Version -> topic changed at that version (its latest change only).
    changes: BTreeMap<u64, String>,
}

#[derive(Default)]
pub struct RetainedTable {
    t: Mutex<Inner>,
}

impl RetainedTable {
    pub fn version(&self) -> u64 {
        self.t.lock().expect("retained lock").version
    }

    pub fn update(&self, topic: String, stamp: Stamp, msg: Option<Arc<Message>>) {
        let mut t = self.t.lock().expect("retained lock");
        t.version += 1;
        let v = t.version;
        if let Some((old, ..)) = t.entries.insert(topic.clone(), (v, stamp, msg)) {
            t.changes.remove(&old);
        }
        t.changes.insert(v, topic);
    }

    /// Writes changed after version `base` (all of them for 0), and the
    /// version they bring a peer to.
    pub fn since(&self, base: u64) -> (u64, Vec<Write>) {
        let t = self.t.lock().expect("retained lock");
        let out = t
            .changes
            .range(base.saturating_add(1)..)
            .filter_map(|(_, topic)| t.entries.get(topic).map(|(_, s, m)| (topic.clone(), s.clone(), m.clone())))
            .collect();
        (t.version, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ms: u64) -> Stamp {
        Stamp { millis: ms, node: Arc::from("n1") }
    }

    /// A peer that holds version `b` gets each topic changed since, once,
    /// in its latest state; a peer that holds nothing gets everything.
    #[test]
    fn changes_since_a_version() {
        let t = RetainedTable::default();
        t.update("a".into(), stamp(1), None);
        t.update("b".into(), stamp(2), None);
        t.update("a".into(), stamp(3), None);
        let (v, all) = t.since(0);
        assert_eq!(v, 3);
        let topics: Vec<(String, u64)> = all.iter().map(|(t, s, _)| (t.clone(), s.millis)).collect();
        assert_eq!(topics, vec![("b".to_owned(), 2), ("a".to_owned(), 3)]);
        let (_, after2) = t.since(2);
        assert_eq!(after2.len(), 1);
        assert_eq!(t.since(3).1.len(), 0);
    }
}
