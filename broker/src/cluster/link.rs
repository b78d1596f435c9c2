//! One link task per peer: connects (with backoff), joins, then sends
//! heartbeats, route syncs, retained syncs and forward batches.
//!
//! Forwards go on one stream per session, several batches in flight and
//! answered in order; heartbeats and syncs go one request at a time, each
//! only once no batch is in flight. That keeps a peer's view in our order
//! (routes before the forwards that need them, forwards in queue order,
//! which is what lets the receiver deduplicate by the highest id). Any failure drops the
//! connection and starts over with backoff; a peer that answers "unknown
//! peer" (it restarted) is joined again at once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use chaos_proto::broker::v1 as pb;
use chaos_proto::broker::v1::cluster_client::ClusterClient;
use tokio::time::{Instant, sleep, sleep_until};
use tonic::transport::{Channel, Endpoint};

use super::error::{ClusterError, is_unknown_peer};
use super::members::{Peer, PeerState};
use super::service::me;
use super::{Node, convert};
use crate::store::Op;

/// Forwards per request.
const BATCH: usize = 512;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Starts the peer's link unless it runs.
pub fn ensure(node: Arc<Node>, peer: Arc<Peer>) {
    let mut link = peer.link.lock().expect("link lock");
    if link.as_ref().is_some_and(|h| !h.is_finished()) {
        return;
    }
    *link = Some(tokio::spawn(run(node, peer.clone())));
}

/// Learns members from a member list; starts links to the new ones.
pub fn learn(node: &Arc<Node>, list: Vec<pb::Node>) {
    for n in list {
        if n.name == node.settings.node_name || n.name.is_empty() {
            continue;
        }
        let (p, new) = node.members.get_or_insert(&n.name, &n.cluster_addr, n.incarnation, node.settings.forward_queue);
        p.set_mqtt_addr(&n.mqtt_addr);
        // A peer known only from restored forwards has no address yet.
        let unknown = !new && p.addr().is_empty() && !n.cluster_addr.is_empty();
        if unknown {
            n.cluster_addr.clone_into(&mut p.addr.lock().expect("addr lock"));
        }
        if new || unknown {
            tracing::info!(peer = %n.name, addr = %n.cluster_addr, "member learned");
            node.remember_peer(&n.name, &n.cluster_addr);
        }
        ensure(node.clone(), p);
    }
}

async fn connect(addr: &str, node: &Node) -> Result<ClusterClient<Channel>, tonic::transport::Error> {
    let timeout = node.settings.down_after.max(Duration::from_secs(1));
    let ch = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(super::service::H2_WINDOW)
        .initial_connection_window_size(super::service::H2_WINDOW)
        .connect()
        .await?;
    Ok(ClusterClient::new(ch))
}

/// Joins through a seed until one attempt is answered; a name collision
/// stops the node.
pub async fn join_seed(node: Arc<Node>, seed: String) {
    let mut backoff = BACKOFF_MIN;
    let mut warned = false;
    loop {
        let r = match connect(&seed, &node).await {
            Ok(mut c) => {
                c.join(pb::JoinRequest { node: Some(me(&node)) }).await.map_err(|s| (s.code(), s.message().to_owned()))
            }
            Err(e) => Err((tonic::Code::Unavailable, format!("connecting: {}", chain(&e)))),
        };
        match r {
            Ok(resp) => {
                tracing::info!(%seed, "joined the cluster through seed");
                learn(&node, resp.into_inner().members);
                return;
            }
            Err((tonic::Code::AlreadyExists, e)) => return fatal_collision(&node, &seed, e),
            Err((_, e)) => {
                node.metrics.join_failures.fetch_add(1, Relaxed);
                if !warned {
                    tracing::warn!(%seed, error = %e, "seed does not answer: retrying with backoff");
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = sleep(backoff) => {}
            _ = node.shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The cluster refused this node's name: the node stops (server::run_node
/// returns the error, the binary exits with it).
fn fatal_collision(node: &Node, seed: &str, reason: String) {
    let e = ClusterError::JoinRefused { seed: seed.to_owned(), reason };
    tracing::error!("{e}");
    *node.fatal_error.lock().expect("fatal error lock") = Some(e);
    node.fatal.cancel();
}

/// Why a session with the peer ended.
enum End {
    Failed(String),
    /// The peer does not know us: join again at once.
    Rejoin,
    Stop,
}

async fn run(node: Arc<Node>, peer: Arc<Peer>) {
    let mut backoff = BACKOFF_MIN;
    let mut last_state = peer.state(&node.settings);
    let mut failing = false;
    loop {
        let end = tokio::select! {
            e = session(&node, &peer, &mut last_state) => e,
            _ = node.shutdown.cancelled() => End::Stop,
            _ = node.fatal.cancelled() => End::Stop,
        };
        // The peer holds what it held; we learn it again from its answers.
        peer.acked_version.store(u64::MAX, Relaxed);
        peer.retained_acked.store(u64::MAX, Relaxed);
        apply_limit(&node, &peer);
        reassign(&node, &peer).await;
        match end {
            End::Stop => return,
            End::Rejoin => {
                backoff = BACKOFF_MIN;
                continue;
            }
            End::Failed(e) => {
                node.metrics.link_failures.fetch_add(1, Relaxed);
                if !failing {
                    tracing::warn!(peer = %peer.name, error = %e, "link to peer failed: reconnecting with backoff");
                    failing = true;
                }
            }
        }
        let state = peer.state(&node.settings);
        if state != last_state {
            tracing::warn!(peer = %peer.name, state = state.label(), "peer state changed");
            last_state = state;
        }
        tokio::select! {
            _ = sleep(backoff) => {}
            _ = node.shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
        if peer.state(&node.settings) == PeerState::Up {
            failing = false;
        }
    }
}

/// One connection's worth of work: join, then serve the peer until an
/// error.
async fn session(node: &Arc<Node>, peer: &Arc<Peer>, last_state: &mut PeerState) -> End {
    let addr = peer.addr();
    let mut c = match connect(&addr, node).await {
        Ok(c) => c,
        Err(e) => {
            peer.unanswered.store(true, Relaxed);
            return End::Failed(format!("connecting to {addr}: {}", chain(&e)));
        }
    };
    match c.join(pb::JoinRequest { node: Some(me(node)) }).await {
        Ok(r) => {
            peer.unanswered.store(false, Relaxed);
            peer.heard();
            learn(node, r.into_inner().members);
        }
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            fatal_collision(node, &addr, s.message().to_owned());
            return End::Stop;
        }
        Err(s) => {
            peer.unanswered.store(true, Relaxed);
            return End::Failed(format!("join: {s}"));
        }
    }
    let state = peer.state(&node.settings);
    if state != *last_state {
        tracing::info!(peer = %peer.name, state = state.label(), "peer state changed");
        *last_state = state;
    }
    let mut next_hb = Instant::now();
    let mut flow = None;
    loop {
        if Instant::now() >= next_hb {
            next_hb = Instant::now() + node.settings.heartbeat;
            let req = pb::HeartbeatRequest {
                from: node.settings.node_name.clone(),
                incarnation: node.incarnation,
                route_version: node.routes.version(),
            };
            match c.heartbeat(req).await {
                Ok(r) => {
                    peer.heard();
                    // Back: a limit of its down time is lifted.
                    apply_limit(node, peer);
                    let r = r.into_inner();
                    peer.acked_version.store(r.held_route_version, Relaxed);
                    learn(node, r.members);
                }
                Err(s) => return failed(s, "heartbeat"),
            }
        }
        // Routes before forwards: a forward is sent because of a route.
        if let Err(e) = sync_routes(node, peer, &mut c).await {
            return e;
        }
        if let Err(e) = sync_retained(node, peer, &mut c).await {
            return e;
        }
        if let Err(e) = forward(node, peer, &mut c, &mut flow, next_hb).await {
            return e;
        }
        let state = peer.state(&node.settings);
        if state != *last_state {
            tracing::info!(peer = %peer.name, state = state.label(), "peer state changed");
            *last_state = state;
        }
        tokio::select! {
            _ = peer.queue.wake.notified() => {}
            _ = sleep_until(next_hb) => {}
        }
    }
}

/// An error with its causes ("transport error: tcp connect error:
/// Connection refused"), where tonic's own says only "transport error".
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The down-peer limit (forward.rs), checked whenever a session ends.
fn apply_limit(node: &Node, peer: &Peer) {
    let down_for = (peer.state(&node.settings) == PeerState::Down)
        .then(|| peer.silent_for().saturating_sub(node.settings.down_after));
    let gone = peer.queue.limit(node, &peer.name, down_for);
    if !gone.is_empty() {
        node.store_send(Op::DelForwards(Arc::from(peer.name.as_str()), gone));
    }
}

/// A peer the failure detector calls down gets no shared-group message
/// it has not acked: the router places them again on members that are up
/// (forward.rs `take_shared`). Checked whenever a session ends, so nothing
/// is in flight.
async fn reassign(node: &Node, peer: &Peer) {
    if peer.state(&node.settings) != PeerState::Down {
        return;
    }
    let name: Arc<str> = Arc::from(peer.name.as_str());
    let taken = peer.queue.take_shared(node, &name);
    if taken.is_empty() {
        return;
    }
    let sent = taken.iter().filter(|r| r.tried).count();
    let m = &node.metrics;
    m.reassigned_sent.fetch_add(sent as u64, Relaxed);
    m.reassigned_unsent.fetch_add((taken.len() - sent) as u64, Relaxed);
    tracing::warn!(
        peer = %peer.name,
        messages = taken.len(),
        sent_before = sent,
        "peer down: its shared-group messages go to members that are up (those it had been sent may reach \
         their group twice if it delivered them before it went down)"
    );
    if let Err(e) = node.router.send(crate::inbox::ToRouter::Reassign(Box::new(taken))).await {
        tracing::error!(error = ?e, "router gone: shared-group messages of a down peer not placed again");
    }
}

fn failed(s: tonic::Status, what: &str) -> End {
    if is_unknown_peer(&s) { End::Rejoin } else { End::Failed(format!("{what}: {s}")) }
}

async fn sync_routes(node: &Node, peer: &Peer, c: &mut ClusterClient<Channel>) -> Result<(), End> {
    // Twice at most: a delta the peer could not apply is followed by the
    // full table.
    for _ in 0..2 {
        let held = peer.acked_version.load(Relaxed);
        if held == node.routes.version() {
            return Ok(());
        }
        let s = node.routes.sync_from(held);
        if s.full {
            node.metrics.resyncs_sent.fetch_add(1, Relaxed);
        }
        let route = |((filter, share_group), max_qos): ((String, String), u8)| pb::Route {
            filter,
            share_group,
            max_qos: u32::from(max_qos),
        };
        let req = pb::SyncRoutesRequest {
            from: node.settings.node_name.clone(),
            incarnation: node.incarnation,
            full: s.full,
            base_version: s.base,
            version: s.version,
            upserts: s.upserts.into_iter().map(route).collect(),
            removed: s.removed.into_iter().map(|k| route((k, 0))).collect(),
        };
        match c.sync_routes(req).await {
            Ok(r) => {
                peer.heard();
                let held = r.into_inner().held_version;
                // A delta that did not apply: unknown base, full next.
                let held = if held != s.version && !s.full { u64::MAX } else { held };
                peer.acked_version.store(held, Relaxed);
                peer.resynced();
            }
            Err(s) => return Err(failed(s, "sync routes")),
        }
    }
    Ok(())
}

/// Retained writes per request.
const RETAINED_BATCH: usize = 256;

/// The whole retained set at the start of a link session (the peer may
/// have missed anything before), then what changed since.
async fn sync_retained(node: &Node, peer: &Peer, c: &mut ClusterClient<Channel>) -> Result<(), End> {
    let held = peer.retained_acked.load(Relaxed);
    if held == node.retained.version() {
        return Ok(());
    }
    let full = held == u64::MAX;
    let (version, writes) = node.retained.since(if full { 0 } else { held });
    let mut chunks = writes.chunks(RETAINED_BATCH).peekable();
    if chunks.peek().is_none() {
        peer.retained_acked.store(version, Relaxed);
        return Ok(());
    }
    for chunk in chunks {
        let req = pb::SyncRetainedRequest {
            from: node.settings.node_name.clone(),
            incarnation: node.incarnation,
            full,
            version,
            entries: chunk.iter().map(convert::retained_to_wire).collect(),
        };
        match c.sync_retained(req).await {
            Ok(_) => peer.heard(),
            Err(s) => return Err(failed(s, "sync retained")),
        }
    }
    peer.retained_acked.store(version, Relaxed);
    Ok(())
}

/// Batches in flight on a forward stream.
const WINDOW: usize = 8;

/// The session's forward stream: batches sent in queue order, answered in
/// that order.
struct Outflow {
    tx: tokio::sync::mpsc::Sender<pb::ForwardRequest>,
    acks: tonic::Streaming<pb::ForwardResponse>,
    /// (seq, messages) per batch in flight, oldest first.
    in_flight: VecDeque<(u64, usize)>,
    /// Messages in flight: the queue's first `sending`.
    sending: usize,
    next_seq: u64,
}

async fn open(c: &mut ClusterClient<Channel>) -> Result<Outflow, End> {
    let (tx, rx) = tokio::sync::mpsc::channel(WINDOW);
    match c.forward_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
        Ok(r) => Ok(Outflow { tx, acks: r.into_inner(), in_flight: VecDeque::new(), sending: 0, next_seq: 1 }),
        Err(s) => Err(failed(s, "forward stream")),
    }
}

/// Sends what is queued with up to WINDOW batches in flight until all of it
/// is answered, or until a heartbeat is due (then it stops sending and
/// returns once what is in flight is answered, so that heartbeats and route
/// syncs also go out under a steady load). On failure the
/// batches in flight are retried (QoS 1/2) or dropped (QoS 0) and the
/// stream is closed.
async fn forward(
    node: &Node,
    peer: &Peer,
    c: &mut ClusterClient<Channel>,
    flow: &mut Option<Outflow>,
    next_hb: Instant,
) -> Result<(), End> {
    let r = pump(node, peer, c, flow, next_hb).await;
    if r.is_err()
        && let Some(f) = flow.take()
    {
        peer.queue.failed(f.sending);
    }
    r
}

async fn pump(
    node: &Node,
    peer: &Peer,
    c: &mut ClusterClient<Channel>,
    flow: &mut Option<Outflow>,
    next_hb: Instant,
) -> Result<(), End> {
    let wait = node.settings.down_after.max(Duration::from_secs(1));
    loop {
        let pause = Instant::now() >= next_hb;
        if flow.as_ref().is_none_or(|f| f.in_flight.len() < WINDOW) && !pause {
            let f = match flow {
                Some(f) => f,
                None => flow.insert(open(c).await?),
            };
            let messages = peer.queue.peek_from(f.sending, BATCH, |e| pb::Forwarded {
                message_id: e.id,
                publish: Some(convert::to_wire(&e.msg)),
                origin_incarnation: if e.inc == node.incarnation { 0 } else { e.inc },
                shared: e
                    .shared
                    .iter()
                    .map(|(f, g)| pb::Route { filter: f.clone(), share_group: g.clone(), max_qos: 0 })
                    .collect(),
            });
            if !messages.is_empty() {
                let n = messages.len();
                let seq = f.next_seq;
                f.next_seq += 1;
                let req = pb::ForwardRequest {
                    from: node.settings.node_name.clone(),
                    incarnation: node.incarnation,
                    messages,
                    seq,
                };
                f.in_flight.push_back((seq, n));
                f.sending += n;
                peer.queue.counters.sent.fetch_add(n as u64, Relaxed);
                if f.tx.send(req).await.is_err() {
                    return Err(End::Failed("forward stream: closed by the transport".into()));
                }
                continue;
            }
        }
        let Some(f) = flow.as_mut().filter(|f| !f.in_flight.is_empty()) else {
            return Ok(());
        };
        let ack = match tokio::time::timeout(wait, f.acks.message()).await {
            Ok(Ok(Some(a))) => a,
            Ok(Ok(None)) => return Err(End::Failed("forward stream: ended by the peer".into())),
            Ok(Err(s)) => return Err(failed(s, "forward")),
            Err(_) => return Err(End::Failed(format!("forward: no answer within {wait:?}"))),
        };
        let (seq, n) = f.in_flight.pop_front().expect("in flight");
        if ack.seq != seq {
            return Err(End::Failed(format!("forward: answer for batch {} where {seq} was due", ack.seq)));
        }
        f.sending -= n;
        peer.heard();
        // The publishers' acks these forwards held go out in one write per
        // connection, not one per ack.
        let gone = crate::outbox::corked(|| {
            peer.queue.acked(n, |e| node.metrics.observe_forward(e.msg.received_at.elapsed()))
        });
        if !gone.is_empty() {
            node.store_send(Op::DelForwards(Arc::from(peer.name.as_str()), gone));
        }
    }
}
