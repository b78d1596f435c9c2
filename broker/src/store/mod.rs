//! Durable store: redb, written by one dedicated thread.
//!
//! The router sends `Op`s in order. The thread applies them in write
//! transactions committed with `Durability::Immediate` (fsync) and only after
//! the commit hands over the packets queued behind them (`Op::Then`): that is
//! how a PUBACK/PUBREC waits for the message to be on disk without the router
//! ever blocking on I/O.

pub mod record;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::time::Instant;

use redb::{Database, Durability, ReadableTable, TableDefinition};

use crate::config::FsyncPolicy;
use crate::message::Message;
use crate::metrics::Metrics;
use record::{Entry, SessionMeta};

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const QUEUE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("queue");
const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");
const INQOS2: TableDefinition<(&str, u16), ()> = TableDefinition::new("incoming_qos2");
/// Cluster forwards acknowledged to their publisher and not yet to the peer:
/// (peer, message id) -> origin incarnation (8 bytes) + message record.
const FORWARDS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("cluster_forwards");
/// Receiver's deduplication: (origin node, its incarnation) -> (highest
/// message id routed, wall-clock ms of the update, for pruning).
const DEDUP: TableDefinition<(&str, u64), (u64, u64)> = TableDefinition::new("cluster_dedup");
/// Peers' cluster addresses, so that restored forwards know where to go.
const PEERS: TableDefinition<&str, &str> = TableDefinition::new("cluster_peers");
/// Incarnations remembered per origin: a forward older than this many
/// restarts of its origin is no longer on the origin's disk either.
const DEDUP_KEEP: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening store {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("creating data directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store operation failed")]
    Db(#[source] Box<redb::Error>),
    #[error("corrupt record in table {table}: {source}")]
    Corrupt {
        table: &'static str,
        #[source]
        source: crate::codec::DecodeError,
    },
}

fn db<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(Box::new(e.into()))
}

pub enum Op {
    PutSession(Arc<str>, Vec<u8>),
    /// Removes a session with its messages and incoming QoS 2 state.
    DelSession(Arc<str>),
    PutEntry(Arc<str>, u64, Vec<u8>),
    DelEntry(Arc<str>, u64),
    PutInQos2(Arc<str>, u16),
    DelInQos2(Arc<str>, u16),
    PutRetained(String, Vec<u8>),
    DelRetained(String),
    /// A forward for `peer`, numbered `id` (the record: origin incarnation
    /// and message, `cluster::forward::encode`).
    PutForward(Arc<str>, u64, Vec<u8>),
    DelForwards(Arc<str>, Vec<u64>),
    /// Highest message id routed from (origin, incarnation).
    PutDedup(Arc<str>, u64, u64),
    PutPeer(String, String),
    /// Called once the ops before it are committed: with true after the
    /// commit (send the ack), with false when it failed (withhold it).
    Then(Box<dyn FnOnce(bool) + Send>),
    /// Ops committed in one transaction, never split across two (see
    /// `StoreHandle::hold`).
    Atomic(Vec<Op>),
}

#[derive(Default)]
pub struct LoadedSession {
    pub meta: Option<SessionMeta>,
    pub entries: Vec<(u64, Entry)>,
    pub incoming_qos2: Vec<u16>,
}

#[derive(Default)]
pub struct Loaded {
    pub sessions: HashMap<String, LoadedSession>,
    /// With the stamp of their last write (default for records older than
    /// stamps).
    pub retained: Vec<(Message, crate::message::Stamp)>,
    pub cluster: LoadedCluster,
}

/// What a clustered node left on disk.
#[derive(Default)]
pub struct LoadedCluster {
    /// (peer, id, record), in id order per peer.
    pub forwards: Vec<(String, u64, Vec<u8>)>,
    /// (origin, incarnation, highest id routed).
    pub dedup: Vec<(String, u64, u64)>,
    /// (name, cluster address).
    pub peers: Vec<(String, String)>,
}

impl Op {
    /// The ops of an `Atomic` unit, or the op itself.
    fn flatten(self) -> Vec<Op> {
        match self {
            Op::Atomic(ops) => ops,
            op => vec![op],
        }
    }
}

pub struct StoreHandle {
    tx: mpsc::Sender<Op>,
    /// Ops collected between `hold` and `release`.
    held: std::cell::RefCell<Option<Vec<Op>>>,
}

impl Clone for StoreHandle {
    /// A clone holds nothing back.
    fn clone(&self) -> Self {
        StoreHandle { tx: self.tx.clone(), held: std::cell::RefCell::new(None) }
    }
}

impl StoreHandle {
    /// A sender for another thread's writes (the cluster's), not subject
    /// to this handle's `hold`. The writer thread lives while one exists.
    pub fn sender(&self) -> mpsc::Sender<Op> {
        self.tx.clone()
    }

    pub fn send(&self, op: Op) {
        if let Some(held) = self.held.borrow_mut().as_mut() {
            held.push(op);
            return;
        }
        // The thread only exits when every handle is gone.
        let _ = self.tx.send(op);
    }

    /// Ops sent from now until `release` reach the disk in the same commit
    /// or not at all. The writer batches whatever has arrived, so without
    /// this a commit could hold the first ops of one message and not the
    /// rest (an incoming QoS 2 packet id recorded, its message not queued).
    pub fn hold(&self) {
        *self.held.borrow_mut() = Some(Vec::new());
    }

    pub fn release(&self) {
        if let Some(ops) = self.held.borrow_mut().take()
            && !ops.is_empty()
        {
            let _ = self.tx.send(Op::Atomic(ops));
        }
    }
}

pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir { path: dir.into(), source })?;
        let path = dir.join("broker.redb");
        let db = Database::create(&path).map_err(|e| StoreError::Open { path, source: Box::new(e.into()) })?;
        let txn = db.begin_write().map_err(db_err)?;
        {
            txn.open_table(SESSIONS).map_err(db_err)?;
            txn.open_table(QUEUE).map_err(db_err)?;
            txn.open_table(RETAINED).map_err(db_err)?;
            txn.open_table(INQOS2).map_err(db_err)?;
            txn.open_table(FORWARDS).map_err(db_err)?;
            txn.open_table(DEDUP).map_err(db_err)?;
            txn.open_table(PEERS).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(Store { db })
    }

    pub fn load(&self) -> Result<Loaded, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let mut out = Loaded::default();
        for row in txn.open_table(SESSIONS).map_err(db_err)?.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let meta =
                record::decode_meta(v.value()).map_err(|source| StoreError::Corrupt { table: "sessions", source })?;
            out.sessions.entry(k.value().to_owned()).or_default().meta = Some(meta);
        }
        for row in txn.open_table(QUEUE).map_err(db_err)?.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let (client, seq) = k.value();
            let e = record::decode_entry(v.value()).map_err(|source| StoreError::Corrupt { table: "queue", source })?;
            out.sessions.entry(client.to_owned()).or_default().entries.push((seq, e));
        }
        for row in txn.open_table(INQOS2).map_err(db_err)?.iter().map_err(db_err)? {
            let (k, _) = row.map_err(db_err)?;
            let (client, pid) = k.value();
            out.sessions.entry(client.to_owned()).or_default().incoming_qos2.push(pid);
        }
        for row in txn.open_table(RETAINED).map_err(db_err)?.iter().map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            let mut rd = crate::codec::Rd::new(bytes::Bytes::copy_from_slice(v.value()));
            let corrupt = |source| StoreError::Corrupt { table: "retained", source };
            let m = record::decode_message(&mut rd).map_err(corrupt)?;
            let stamp = record::decode_stamp(&mut rd).map_err(corrupt)?;
            out.retained.push((m, stamp));
        }
        for row in txn.open_table(FORWARDS).map_err(db_err)?.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let (peer, id) = k.value();
            out.cluster.forwards.push((peer.to_owned(), id, v.value().to_vec()));
        }
        for row in txn.open_table(DEDUP).map_err(db_err)?.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let ((origin, inc), (top, _)) = (k.value(), v.value());
            out.cluster.dedup.push((origin.to_owned(), inc, top));
        }
        for row in txn.open_table(PEERS).map_err(db_err)?.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.cluster.peers.push((k.value().to_owned(), v.value().to_owned()));
        }
        // Sessions whose meta is gone were being deleted: drop their rest.
        out.sessions.retain(|_, s| s.meta.is_some());
        Ok(out)
    }

    /// Starts the writer thread.
    pub fn spawn(self, policy: FsyncPolicy, metrics: Arc<Metrics>) -> StoreHandle {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("broker-store".into())
            .spawn(move || self.run(rx, policy, &metrics))
            .expect("spawning the store thread");
        StoreHandle { tx, held: std::cell::RefCell::new(None) }
    }

    fn run(self, rx: mpsc::Receiver<Op>, policy: FsyncPolicy, metrics: &Metrics) {
        let mut batch: Vec<Op> = Vec::new();
        while let Ok(first) = rx.recv() {
            batch.push(first);
            match policy {
                FsyncPolicy::EveryAck => batch.extend(rx.try_iter()),
                FsyncPolicy::Group(window) => {
                    let deadline = Instant::now() + window;
                    loop {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        match rx.recv_timeout(deadline - now) {
                            Ok(op) => batch.push(op),
                            Err(_) => break,
                        }
                    }
                }
            }
            match self.commit(&mut batch) {
                Ok(()) => {
                    metrics.store_commits.fetch_add(1, Relaxed);
                    for op in batch.drain(..).flat_map(Op::flatten) {
                        if let Op::Then(then) = op {
                            then(true);
                        }
                    }
                }
                Err(e) => {
                    // The acks behind a failed commit are never sent: the
                    // publisher keeps the message and sends it again.
                    metrics.store_errors.fetch_add(1, Relaxed);
                    tracing::error!(error = %e, source = ?std::error::Error::source(&e), "store commit failed; acknowledgements withheld");
                    for op in batch.drain(..).flat_map(Op::flatten) {
                        if let Op::Then(then) = op {
                            then(false);
                        }
                    }
                }
            }
        }
    }

    fn commit(&self, batch: &mut [Op]) -> Result<(), StoreError> {
        if batch.iter().all(|op| matches!(op, Op::Then(..))) {
            return Ok(());
        }
        let mut txn = self.db.begin_write().map_err(db)?;
        txn.set_durability(Durability::Immediate);
        {
            let mut sessions = txn.open_table(SESSIONS).map_err(db)?;
            let mut queue = txn.open_table(QUEUE).map_err(db)?;
            let mut retained = txn.open_table(RETAINED).map_err(db)?;
            let mut inq = txn.open_table(INQOS2).map_err(db)?;
            // Opened on the first cluster op only: a node that is not
            // clustered pays nothing for them.
            let mut cluster: Option<ClusterTables> = None;
            let flat = || {
                batch.iter().flat_map(|op| match op {
                    Op::Atomic(ops) => ops.iter().collect::<Vec<_>>(),
                    op => vec![op],
                })
            };
            // A forward the peer acknowledged before it was written is
            // neither written nor deleted: the state after this commit is
            // the same, and under load many forwards are acked that fast.
            let acked: HashSet<(&str, u64)> = flat()
                .filter_map(|op| match op {
                    Op::DelForwards(p, ids) => Some(ids.iter().map(move |id| (&**p, *id))),
                    _ => None,
                })
                .flatten()
                .collect();
            let mut skipped: HashSet<(&str, u64)> = HashSet::new();
            for op in flat() {
                let rest;
                let op = match op {
                    Op::PutForward(p, id, _) if acked.contains(&(&**p, *id)) => {
                        skipped.insert((&**p, *id));
                        continue;
                    }
                    Op::DelForwards(p, ids) if !skipped.is_empty() => {
                        rest = Op::DelForwards(
                            p.clone(),
                            ids.iter().copied().filter(|id| !skipped.contains(&(&**p, *id))).collect(),
                        );
                        &rest
                    }
                    op => op,
                };
                match op {
                    Op::PutSession(c, v) => {
                        sessions.insert(&**c, v.as_slice()).map_err(db)?;
                    }
                    Op::DelSession(c) => {
                        sessions.remove(&**c).map_err(db)?;
                        let keys: Vec<u64> = queue
                            .range((&**c, 0u64)..=(&**c, u64::MAX))
                            .map_err(db)?
                            .filter_map(|r| r.ok().map(|(k, _)| k.value().1))
                            .collect();
                        for seq in keys {
                            queue.remove((&**c, seq)).map_err(db)?;
                        }
                        let pids: Vec<u16> = inq
                            .range((&**c, 0u16)..=(&**c, u16::MAX))
                            .map_err(db)?
                            .filter_map(|r| r.ok().map(|(k, _)| k.value().1))
                            .collect();
                        for pid in pids {
                            inq.remove((&**c, pid)).map_err(db)?;
                        }
                    }
                    Op::PutEntry(c, seq, v) => {
                        queue.insert((&**c, *seq), v.as_slice()).map_err(db)?;
                    }
                    Op::DelEntry(c, seq) => {
                        queue.remove((&**c, *seq)).map_err(db)?;
                    }
                    Op::PutInQos2(c, pid) => {
                        inq.insert((&**c, *pid), ()).map_err(db)?;
                    }
                    Op::DelInQos2(c, pid) => {
                        inq.remove((&**c, *pid)).map_err(db)?;
                    }
                    Op::PutRetained(t, v) => {
                        retained.insert(t.as_str(), v.as_slice()).map_err(db)?;
                    }
                    Op::DelRetained(t) => {
                        retained.remove(t.as_str()).map_err(db)?;
                    }
                    Op::PutForward(..) | Op::DelForwards(..) | Op::PutDedup(..) | Op::PutPeer(..) => {
                        let t = match cluster.as_mut() {
                            Some(t) => t,
                            None => cluster.insert(ClusterTables {
                                forwards: txn.open_table(FORWARDS).map_err(db)?,
                                dedup: txn.open_table(DEDUP).map_err(db)?,
                                peers: txn.open_table(PEERS).map_err(db)?,
                            }),
                        };
                        t.apply(op)?;
                    }
                    Op::Then(..) | Op::Atomic(_) => {}
                }
            }
        }
        txn.commit().map_err(db)?;
        Ok(())
    }
}

struct ClusterTables<'t> {
    forwards: redb::Table<'t, (&'static str, u64), &'static [u8]>,
    dedup: redb::Table<'t, (&'static str, u64), (u64, u64)>,
    peers: redb::Table<'t, &'static str, &'static str>,
}

impl ClusterTables<'_> {
    fn apply(&mut self, op: &Op) -> Result<(), StoreError> {
        match op {
            Op::PutForward(p, id, v) => {
                self.forwards.insert((&**p, *id), v.as_slice()).map_err(db)?;
            }
            Op::DelForwards(p, ids) => {
                for id in ids {
                    self.forwards.remove((&**p, *id)).map_err(db)?;
                }
            }
            Op::PutDedup(origin, inc, top) => {
                let now = crate::cluster::unix_ms();
                self.dedup.insert((&**origin, *inc), (*top, now)).map_err(db)?;
                let mut all: Vec<(u64, u64)> = self
                    .dedup
                    .range((&**origin, 0u64)..=(&**origin, u64::MAX))
                    .map_err(db)?
                    .filter_map(|r| r.ok().map(|(k, v)| (v.value().1, k.value().1)))
                    .collect();
                if all.len() > DEDUP_KEEP {
                    all.sort_unstable();
                    for (_, old) in &all[..all.len() - DEDUP_KEEP] {
                        self.dedup.remove((&**origin, *old)).map_err(db)?;
                    }
                }
            }
            Op::PutPeer(name, addr) => {
                self.peers.insert(name.as_str(), addr.as_str()).map_err(db)?;
            }
            _ => {}
        }
        Ok(())
    }
}

fn db_err<E: Into<redb::Error>>(e: E) -> StoreError {
    db(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ops held back go to the writer as one unit, reach the disk together,
    /// and a `Then` behind them still fires once they are durable.
    #[test]
    fn held_ops_are_committed_as_one_unit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let handle = store.spawn(FsyncPolicy::EveryAck, Arc::new(Metrics::default()));
        let client: Arc<str> = Arc::from("c");
        let meta = SessionMeta { expiry: u32::MAX, v5: false, subs: Vec::new() };
        handle.send(Op::PutSession(client.clone(), record::encode_meta(&meta)));
        handle.hold();
        handle.send(Op::PutInQos2(client.clone(), 7));
        handle.send(Op::PutInQos2(client.clone(), 8));
        let (tx, rx) = std::sync::mpsc::channel();
        handle.send(Op::Then(Box::new(move |durable| tx.send(durable).unwrap())));
        handle.release();
        let durable =
            rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the Then inside the unit never fired");
        assert!(durable, "the unit's commit failed");
        drop(handle);
        // The writer thread owns the database until it exits.
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let store = loop {
            match Store::open(dir.path()) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(10)),
                Err(e) => panic!("reopen: {e}"),
            }
        };
        let loaded = store.load().unwrap();
        let mut ids = loaded.sessions["c"].incoming_qos2.clone();
        ids.sort();
        assert_eq!(ids, [7, 8]);
    }
}
