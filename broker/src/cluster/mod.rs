//! The cluster: nodes that join over gRPC (`broker.v1.Cluster`), replicate
//! their subscription routes and forward publishes to each other.
//!
//! Actors (see architecture.md, "Cluster"):
//! - the gRPC service (`service.rs`), answering peers;
//! - one link task per peer (`link.rs`): join, heartbeats, route sync and
//!   forwards, strictly one request at a time, so a peer sees our routes and
//!   our forwards in the order we made them;
//! - the route collector (`routes.rs`): turns the router's subscription
//!   events into the node's versioned route table.
//!
//! The router talks to the cluster only through `Outlet`, whose methods
//! never wait (an unbounded event channel, bounded per-peer forward queues):
//! the router never awaits gRPC. The cluster talks to the router through the
//! router's inbox, like connections do.

mod convert;
mod error;
mod forward;
pub use forward::Reassigned;
mod guard;
mod link;
mod members;
mod metrics;
mod retained;
mod routes;
mod service;
mod status;
mod takeover;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use error::ClusterError;
pub use members::PeerState;
pub use routes::{RouteEvent, RouteKey};
pub use status::{Member, Status, View, unix_ms};

use crate::inbox;
use crate::message::Message;

/// Revision of `broker.v1` this node speaks (cluster.proto's header).
/// 2: forwards go on `ForwardStream` (several batches in flight, answered
/// in order, `seq`) and the receiver deduplicates by the highest id per
/// origin incarnation, which a revision 1 node does not send in order.
pub const PROTOCOL: u32 = 2;

/// Prefix of a remote node's key in the router's subscription trie. MQTT
/// forbids U+0000 in client ids (MQTT 5 1.5.4), so no session has it.
pub const REMOTE_PREFIX: char = '\0';

/// What the cluster needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_name: String,
    /// Where peers reach this node (the bound listener's address unless
    /// configured; an unspecified host is replaced by what a peer sees).
    pub advertise: SocketAddr,
    pub mqtt_addr: String,
    pub seeds: Vec<String>,
    pub heartbeat: Duration,
    pub suspect_after: Duration,
    pub down_after: Duration,
    /// Forwards queued per peer (QoS 1/2 waiting for the peer's ack, and
    /// QoS 0 waiting to be sent) beyond which new ones are dropped.
    pub forward_queue: usize,
    /// A peer down longer than this keeps at most `down_max_queued`.
    pub down_keep: Duration,
    pub down_max_queued: usize,
}

/// State shared by the cluster's tasks.
pub(crate) struct Node {
    pub settings: Settings,
    pub incarnation: u64,
    pub members: members::Members,
    pub routes: routes::LocalRoutes,
    pub retained: retained::RetainedTable,
    pub router: inbox::Sender,
    pub dedup: forward::Dedup,
    pub metrics: metrics::ClusterMetrics,
    pub shutdown: CancellationToken,
    /// Cancelled when this node must stop (its name is taken).
    pub fatal: CancellationToken,
    pub fatal_error: std::sync::Mutex<Option<ClusterError>>,
    /// (node, revision) joins refused for their protocol revision, logged
    /// once each (a refused node retries its join every few seconds).
    pub refused_revisions: std::sync::Mutex<std::collections::HashSet<(String, u32)>>,
    /// The store's queue, on a node with a data directory (taken away when
    /// the node stops, so that the store can close).
    pub store: std::sync::Mutex<Option<std::sync::mpsc::Sender<crate::store::Op>>>,
}

impl Node {
    pub fn has_store(&self) -> bool {
        self.store.lock().expect("store lock").is_some()
    }

    pub fn store_send(&self, op: crate::store::Op) {
        if let Some(s) = self.store.lock().expect("store lock").as_ref() {
            let _ = s.send(op);
        }
    }

    /// Remembers where a peer is, for forwards restored after a restart.
    pub fn remember_peer(&self, name: &str, addr: &str) {
        self.store_send(crate::store::Op::PutPeer(name.to_owned(), addr.to_owned()));
    }
}

/// The router's side of the cluster. Nothing here waits.
#[derive(Clone)]
pub struct Outlet {
    node: Arc<Node>,
    events: mpsc::UnboundedSender<RouteEvent>,
}

impl Outlet {
    /// A local subscription was added (or its QoS changed: remove, then add).
    /// Takes `client`'s session over from the other nodes (see
    /// `takeover.rs`); waits for their answers, at most a few seconds.
    pub async fn take_session(&self, client: &str, clean_start: bool) -> Option<Box<crate::inbox::MovedSession>> {
        takeover::take(&self.node, client, clean_start).await
    }

    /// A retained write this node keeps (its own or a peer's): replicated
    /// to every peer by its link.
    pub fn retained(&self, topic: String, stamp: crate::message::Stamp, msg: Option<Arc<Message>>) {
        self.node.retained.update(topic, stamp, msg);
        for p in self.node.members.all() {
            p.queue.wake.notify_one();
        }
    }

    pub fn route_event(&self, e: RouteEvent) {
        let _ = self.events.send(e);
    }

    /// Queues `msg` for the peer behind a remote key of the trie;
    /// `reliable` when a subscriber there gets it at QoS 1 or 2; `shared`:
    /// the peer's shared groups (filter, group) chosen for it. Returns
    /// `gate`: the publisher's ack, which a reliable forward holds until the
    /// peer acked it or it is on disk.
    pub fn forward(
        &self,
        remote_key: &str,
        msg: &Arc<Message>,
        reliable: bool,
        shared: Vec<RouteKey>,
        gate: Option<&Arc<crate::acks::Gate>>,
    ) -> bool {
        let name = remote_key.trim_start_matches(REMOTE_PREFIX);
        match self.node.members.get(name) {
            Some(peer) => peer.queue.push(&self.node, name, msg.clone(), reliable, shared, gate),
            None => {
                self.node.metrics.forward_no_peer();
                false
            }
        }
    }

    /// Waits while a peer that is up has a congested forward queue (see
    /// `PeerQueue::push`), at most `cluster_suspect_after_ms`: a peer that
    /// does not drain its queue by then is slow or stuck, and what does not
    /// fit its queue is dropped (counted) rather than stalling publishers
    /// for longer.
    pub async fn drained(&self) {
        let node = &self.node;
        let deadline = tokio::time::Instant::now() + node.settings.suspect_after;
        loop {
            let Some(p) = node
                .members
                .all()
                .into_iter()
                .find(|p| p.queue.congested() && p.state(&node.settings) == PeerState::Up)
            else {
                return;
            };
            let wake = p.queue.drained.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if !p.queue.congested() {
                continue;
            }
            node.metrics.backpressure_waits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let until = deadline.min(tokio::time::Instant::now() + Duration::from_millis(100));
            if tokio::time::timeout_at(until, wake).await.is_err() && tokio::time::Instant::now() >= deadline {
                node.metrics.backpressure_timeouts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
        }
    }

    /// Whether the peer behind a remote key of the trie is up (the failure
    /// detector's state): shared groups prefer members on nodes that are.
    pub fn peer_up(&self, remote_key: &str) -> bool {
        let name = remote_key.trim_start_matches(REMOTE_PREFIX);
        self.node.members.get(name).is_some_and(|p| p.state(&self.node.settings) == PeerState::Up)
    }
}

/// A running cluster: `fatal` fires when the node must stop.
pub struct Cluster {
    node: Arc<Node>,
    events: Option<mpsc::UnboundedReceiver<RouteEvent>>,
    pub outlet: Outlet,
    /// Peers this node knew before a restart (from its store).
    restored: Vec<String>,
}

impl Cluster {
    /// Builds the cluster's state; nothing runs until `start`, so the
    /// router can be given its `outlet` first (and report the routes it
    /// restored from disk).
    pub fn new(
        settings: Settings,
        router: inbox::Sender,
        store: Option<std::sync::mpsc::Sender<crate::store::Op>>,
        shutdown: CancellationToken,
    ) -> Cluster {
        let incarnation = incarnation();
        let node = Arc::new(Node {
            settings,
            incarnation,
            members: members::Members::default(),
            routes: routes::LocalRoutes::default(),
            retained: retained::RetainedTable::default(),
            router,
            dedup: forward::Dedup::default(),
            metrics: metrics::ClusterMetrics::default(),
            shutdown,
            fatal: CancellationToken::new(),
            fatal_error: std::sync::Mutex::new(None),
            refused_revisions: Default::default(),
            store: std::sync::Mutex::new(store),
        });
        let (events_tx, events) = mpsc::unbounded_channel();
        let outlet = Outlet { node: node.clone(), events: events_tx };
        Cluster { node, events: Some(events), outlet, restored: Vec::new() }
    }

    /// Takes back what the node left on disk: forwards not yet acked by
    /// their peers (queued again, with their numbers), the peers' addresses
    /// and the receiver's deduplication marks. Before `start`.
    pub fn restore(&mut self, loaded: crate::store::LoadedCluster) {
        let node = &self.node;
        let addrs: std::collections::HashMap<String, String> = loaded.peers.into_iter().collect();
        self.restored = addrs.keys().cloned().collect();
        self.restored.sort();
        node.dedup.restore(loaded.dedup);
        let mut per_peer: std::collections::BTreeMap<String, Vec<forward::Queued>> = Default::default();
        for (peer, id, raw) in loaded.forwards {
            forward::ids_above(id);
            match forward::decode(&raw) {
                Ok((inc, msg, shared)) => per_peer.entry(peer).or_default().push(forward::Queued {
                    id,
                    inc,
                    msg: Arc::new(msg),
                    reliable: true,
                    durable: true,
                    shared,
                    gate: None,
                    // It may have been sent before the restart.
                    tried: true,
                }),
                Err(e) => {
                    node.store_send(crate::store::Op::DelForwards(Arc::from(peer.as_str()), vec![id]));
                    tracing::error!(%peer, id, error = %e, "stored forward unreadable: dropped");
                }
            }
        }
        for (name, items) in per_peer {
            let addr = addrs.get(&name).cloned().unwrap_or_default();
            let (p, _) = node.members.get_or_insert(&name, &addr, 0, node.settings.forward_queue);
            tracing::info!(peer = %name, %addr, forwards = items.len(), "forwards restored from the store");
            p.queue.restore(items);
        }
    }

    /// After a restart, waits (at most `within`) until every peer known
    /// before it has sent its full route table. The node forgets remote
    /// routes when it stops; until a peer's table is back, a publish here
    /// would be acknowledged and reach none of that peer's subscribers
    /// (the peers' links to this node are in their reconnect backoff, up
    /// to 2 s, when it comes back). A peer our link cannot reach is not
    /// waited for. Returns the peers still without routes.
    pub async fn routes_learned(&self, within: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let missing: Vec<String> = self
                .restored
                .iter()
                .filter(|name| {
                    !self.node.members.get(name).is_some_and(|p| {
                        let held = p.held.lock().expect("held lock");
                        (held.incarnation != 0 && held.version != service::UNKNOWN_VERSION)
                            || p.unanswered.load(std::sync::atomic::Ordering::Relaxed)
                    })
                })
                .cloned()
                .collect();
            if missing.is_empty() || tokio::time::Instant::now() >= deadline {
                return missing;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = self.node.shutdown.cancelled() => return missing,
            }
        }
    }

    /// Lets go of the store (the node stopped), so that it can close.
    pub fn close_store(&self) {
        self.node.store.lock().expect("store lock").take();
    }

    /// Serves the Cluster API on `listener`, starts the route collector and
    /// joins the seeds (in the background: a seed that does not answer is
    /// retried with backoff, it does not hold up the node).
    pub fn start(&mut self, listener: TcpListener) {
        let node = self.node.clone();
        if let Some(events) = self.events.take() {
            tokio::spawn(routes::collect(node.clone(), events));
        }
        tokio::spawn(service::serve(node.clone(), listener));
        if node.has_store() {
            tokio::spawn(spill(node.clone()));
        }
        // Peers known from restored forwards: deliver them.
        for p in node.members.all() {
            link::ensure(node.clone(), p);
        }
        for seed in node.settings.seeds.clone() {
            tokio::spawn(link::join_seed(node.clone(), seed));
        }
        tracing::info!(
            node = %node.settings.node_name,
            cluster = %node.settings.advertise,
            seeds = ?node.settings.seeds,
            incarnation = node.incarnation,
            "cluster started"
        );
    }

    /// Resolves when the node must stop; returns why.
    pub async fn fatal(&self) -> ClusterError {
        self.node.fatal.cancelled().await;
        self.node.fatal_error.lock().expect("fatal error lock").take().unwrap_or(ClusterError::Stopped)
    }

    /// Renders the cluster's Prometheus lines (appended to /metrics).
    pub fn metrics_renderer(&self) -> impl Fn(&mut String) + Send + Sync + 'static {
        let node = self.node.clone();
        move |out| metrics::render(&node, out)
    }

    /// The live state for `/cluster` and `/health`.
    pub fn view(&self) -> View {
        View { node: self.node.clone() }
    }

    /// Name and state of every known peer.
    pub fn peers(&self) -> Vec<(String, PeerState)> {
        self.node.members.states(&self.node.settings)
    }
}

/// A reliable forward its peer has not acked this long after its publish
/// is written to the store (and its publisher's ack waits no longer for
/// the peer). A peer that is up acks well within it, so the common case
/// writes nothing.
const SPILL_AFTER: Duration = Duration::from_millis(20);
/// ... and so is every one, whatever its age, once this many wait unwritten.
const SPILL_ABOVE: usize = 16_384;
const SPILL_TICK: Duration = Duration::from_millis(5);

/// Puts on disk what the peers are slow to ack (`PeerQueue::spill`), in
/// one commit per tick for all peers (group commit).
async fn spill(node: Arc<Node>) {
    let mut tick = tokio::time::interval(SPILL_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = node.shutdown.cancelled() => return,
        }
        let Some(before) = std::time::Instant::now().checked_sub(SPILL_AFTER) else { continue };
        for p in node.members.all() {
            let name: Arc<str> = Arc::from(p.name.as_str());
            if let Some(range) = p.queue.spill(&node, &name, before, SPILL_ABOVE) {
                let peer = p.clone();
                node.store_send(crate::store::Op::Then(Box::new(move |durable| {
                    if durable {
                        crate::outbox::corked(|| peer.queue.on_disk(range));
                    }
                })));
            }
        }
    }
}

/// A number that differs at every start: wall-clock nanoseconds mixed with
/// the pid. Only compared for equality, so a clock jump does no harm
/// unless it lands on exactly the same nanosecond.
fn incarnation() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 48)
}
