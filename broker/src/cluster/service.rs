//! The Cluster gRPC service: what this node answers its peers.
//!
//! Every refusal (unknown peer, name collision, invalid request) is one log
//! line and one `broker_cluster_rejected_total{reason}` increment, and the
//! node goes on serving everyone else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;

use chaos_proto::broker::v1 as pb;
use chaos_proto::broker::v1::cluster_server::{Cluster, ClusterServer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use super::error::ClusterError;
use super::forward::Origin;
use super::members::{Peer, PeerState};
use super::{Node, PROTOCOL, convert, link};
use crate::inbox::{Forwarded, FromPeer, RemoteRoutes, ToRouter};

/// Held version of a peer whose table must come whole (it restarted):
/// no delta's base matches it, and a peer told it sends the full table.
pub const UNKNOWN_VERSION: u64 = u64::MAX;

/// HTTP/2 flow-control window (stream and connection), both ways: several
/// forward batches in flight, not the default 64 KiB.
pub const H2_WINDOW: u32 = 8 << 20;

pub async fn serve(node: Arc<Node>, listener: TcpListener) {
    use tokio_stream::StreamExt;
    // Without TCP_NODELAY the answers and HTTP/2 window updates wait for
    // the peer's delayed ACK (Nagle), stalling each round trip by tens of ms.
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        s.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    let stop = node.shutdown.clone();
    let r = tonic::transport::Server::builder()
        .initial_stream_window_size(H2_WINDOW)
        .initial_connection_window_size(H2_WINDOW)
        .add_service(super::guard::Guarded {
            inner: ClusterServer::new(Service { node: node.clone() }),
            node: node.clone(),
        })
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "cluster service stopped");
    }
}

struct Service {
    node: Arc<Node>,
}

/// This node as a member list entry.
pub fn me(node: &Node) -> pb::Node {
    pb::Node {
        name: node.settings.node_name.clone(),
        cluster_addr: node.settings.advertise.to_string(),
        mqtt_addr: node.settings.mqtt_addr.clone(),
        incarnation: node.incarnation,
        protocol: PROTOCOL,
    }
}

pub fn members(node: &Node) -> Vec<pb::Node> {
    let mut v = vec![me(node)];
    for p in node.members.all() {
        v.push(pb::Node {
            name: p.name.clone(),
            cluster_addr: p.addr(),
            mqtt_addr: p.mqtt_addr(),
            incarnation: p.incarnation.load(Relaxed),
            protocol: PROTOCOL,
        });
    }
    v
}

/// `addr` with an unspecified host replaced by the host the request came
/// from (a node listening on 0.0.0.0 without --cluster-advertise).
fn reachable(addr: &str, remote: Option<SocketAddr>) -> Option<String> {
    let a: SocketAddr = addr.parse().ok()?;
    if a.ip().is_unspecified() {
        let r = remote?;
        return Some(SocketAddr::new(r.ip(), a.port()).to_string());
    }
    Some(a.to_string())
}

/// Batches taken and not yet answered per forward stream.
const STREAM_WINDOW: usize = 16;

/// A batch handed to the router, to be answered once it is routed (and
/// durable where it must be).
struct Taken {
    from: String,
    seq: u64,
    accepted: u32,
    duplicates: u32,
    /// (origin incarnation, highest id before this batch) for each mark the
    /// batch raised: put back when its commit fails, so that the retry is
    /// taken again.
    before: Vec<(u64, u64)>,
    routed: oneshot::Receiver<()>,
}

impl Taken {
    async fn answered(self, origin: &Origin) -> Result<pb::ForwardResponse, Status> {
        self.answered_or_fail(origin, &AtomicBool::new(false)).await
    }

    async fn answered_or_fail(self, origin: &Origin, failed: &AtomicBool) -> Result<pb::ForwardResponse, Status> {
        if self.routed.await.is_ok() {
            return Ok(pb::ForwardResponse { accepted: self.accepted, duplicates: self.duplicates, seq: self.seq });
        }
        // The store failed to make the messages and marks durable: the
        // sender retries from this batch on.
        let mut seen = origin.lock().await;
        failed.store(true, Relaxed);
        for (inc, top) in self.before {
            if seen.top(inc) > top {
                seen.set(inc, top);
            }
        }
        Err(ClusterError::Stopped.into())
    }
}

impl Service {
    /// Deduplicates a batch and hands what is new to the router, under the
    /// origin's lock so that batches reach the router in the order their
    /// ids were checked. The marks are raised now (a retry racing this
    /// batch is recognised) and put back if its commit fails. A batch of
    /// duplicates goes to the router too: its answer then waits for the
    /// commits before it, whose messages it names.
    async fn take(&self, origin: &Origin, r: pb::ForwardRequest, failed: Option<&AtomicBool>) -> Result<Taken, Status> {
        self.peer(&r.from, r.incarnation)?;
        let mut seen = origin.lock().await;
        if failed.is_some_and(|f| f.load(Relaxed)) {
            return Err(ClusterError::Stopped.into());
        }
        let mut fresh = Vec::with_capacity(r.messages.len());
        let mut duplicates = 0u32;
        // New highest id per origin incarnation in this batch.
        let mut marks: Vec<(u64, u64)> = Vec::new();
        for f in r.messages {
            let inc = if f.origin_incarnation == 0 { r.incarnation } else { f.origin_incarnation };
            let top = marks.iter().find(|(i, _)| *i == inc).map_or_else(|| seen.top(inc), |(_, t)| *t);
            if f.message_id <= top {
                duplicates += 1;
                continue;
            }
            match marks.iter_mut().find(|(i, _)| *i == inc) {
                Some(m) => m.1 = f.message_id,
                None => marks.push((inc, f.message_id)),
            }
            let shared = f.shared.into_iter().map(|r| (r.filter, r.share_group)).collect();
            match f.publish.ok_or_else(|| "forward without publish".to_owned()).and_then(convert::from_wire) {
                Ok(msg) => fresh.push(FromPeer { msg, shared }),
                // Acknowledged anyway: a retry would be just as bad.
                Err(what) => {
                    let _ = self.reject("invalid", ClusterError::Invalid { from: r.from.clone(), what });
                }
            }
        }
        let accepted = fresh.len() as u32;
        let before = marks.iter().map(|(inc, _)| (*inc, seen.top(*inc))).collect();
        let (done, routed) = oneshot::channel();
        let f = Forwarded { origin: Arc::from(r.from.as_str()), msgs: fresh, marks: marks.clone(), done };
        if self.node.router.send(ToRouter::Forwarded(Box::new(f))).await.is_err() {
            return Err(ClusterError::Stopped.into());
        }
        for (inc, top) in marks {
            seen.set(inc, top);
        }
        drop(seen);
        if duplicates > 0 {
            self.node.dedup.duplicates.fetch_add(u64::from(duplicates), Relaxed);
        }
        Ok(Taken { from: r.from, seq: r.seq, accepted, duplicates, before, routed })
    }

    fn reject(&self, reason: &'static str, e: ClusterError) -> Status {
        self.node.metrics.rejected(reason);
        tracing::warn!(node = %self.node.settings.node_name, reason, "cluster request refused: {e}");
        e.into()
    }

    /// The peer named `from`, as the incarnation it says it is. A new
    /// incarnation (the peer restarted) drops what we held of the old one.
    fn peer(&self, from: &str, incarnation: u64) -> Result<Arc<Peer>, Status> {
        let Some(p) = self.node.members.get(from) else {
            return Err(self.reject("unknown_peer", ClusterError::UnknownPeer(from.to_owned())));
        };
        p.heard();
        let mut held = p.held.lock().expect("held lock");
        if held.incarnation != incarnation {
            // The previous run's routes stay in the router until the new
            // run's full table replaces them: a publish meanwhile is still
            // forwarded (its persistent sessions come back with the same
            // subscriptions). An unknown version makes the peer send the
            // full table, not a delta.
            if held.incarnation != 0 {
                tracing::info!(peer = from, "peer restarted: its routes are replaced by its next full table");
            }
            *held = super::members::Held { incarnation, version: UNKNOWN_VERSION, routes: held.routes };
        }
        drop(held);
        Ok(p)
    }
}

#[tonic::async_trait]
impl Cluster for Service {
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        let remote = req.remote_addr();
        let Some(n) = req.into_inner().node else {
            return Err(
                self.reject("invalid", ClusterError::Invalid { from: "?".into(), what: "join without node".into() })
            );
        };
        let node = &self.node;
        if n.protocol != PROTOCOL {
            let first = node.refused_revisions.lock().expect("refused lock").insert((n.name.clone(), n.protocol));
            let e = ClusterError::Protocol { name: n.name, theirs: n.protocol, ours: PROTOCOL };
            if first {
                return Err(self.reject("protocol", e));
            }
            node.metrics.rejected("protocol");
            return Err(e.into());
        }
        let Some(addr) = reachable(&n.cluster_addr, remote).filter(|_| !n.name.is_empty()) else {
            return Err(self.reject(
                "invalid",
                ClusterError::Invalid { from: n.name, what: format!("cluster address {:?}", n.cluster_addr) },
            ));
        };
        if n.name == node.settings.node_name {
            // A seed list naming this node itself is fine; another node
            // with our name is not.
            if n.incarnation == node.incarnation {
                return Ok(Response::new(pb::JoinResponse { members: members(node) }));
            }
            return Err(self.reject(
                "name_collision",
                ClusterError::NameTaken { name: n.name, existing_addr: node.settings.advertise.to_string(), addr },
            ));
        }
        let (p, new) = node.members.get_or_insert(&n.name, &addr, n.incarnation, node.settings.forward_queue);
        if !new {
            let old_addr = p.addr();
            // Same name from another address while the member we know
            // still answers: a second node with that name, not a restart.
            if old_addr != addr && p.state(&node.settings) != PeerState::Down {
                return Err(self.reject(
                    "name_collision",
                    ClusterError::NameTaken { name: n.name, existing_addr: old_addr, addr },
                ));
            }
            if old_addr != addr {
                tracing::info!(peer = %n.name, from = %old_addr, to = %addr, "member moved");
                *p.addr.lock().expect("addr lock") = addr.clone();
                node.remember_peer(&n.name, &addr);
            }
        }
        p.incarnation.store(n.incarnation, Relaxed);
        p.set_mqtt_addr(&n.mqtt_addr);
        // Whatever we told the previous run of this peer, it holds nothing now.
        p.acked_version.store(u64::MAX, Relaxed);
        p.retained_acked.store(u64::MAX, Relaxed);
        p.heard();
        if new {
            tracing::info!(peer = %n.name, %addr, "member joined");
            // On disk, so that after a restart this node waits for its
            // routes (server::run_node) and finds it for restored forwards.
            node.remember_peer(&n.name, &addr);
        }
        link::ensure(node.clone(), p.clone());
        p.queue.wake.notify_one();
        Ok(Response::new(pb::JoinResponse { members: members(node) }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let p = self.peer(&r.from, r.incarnation)?;
        let held = p.held.lock().expect("held lock").version;
        Ok(Response::new(pb::HeartbeatResponse { held_route_version: held, members: members(&self.node) }))
    }

    async fn sync_routes(
        &self,
        req: Request<pb::SyncRoutesRequest>,
    ) -> Result<Response<pb::SyncRoutesResponse>, Status> {
        let r = req.into_inner();
        let p = self.peer(&r.from, r.incarnation)?;
        let conv = |v: Vec<pb::Route>| -> Result<Vec<((String, String), u8)>, String> {
            v.into_iter()
                .map(|rt| {
                    if !crate::topic::valid_filter(&rt.filter) || rt.max_qos > 2 {
                        return Err(format!("route {:?} qos {}", rt.filter, rt.max_qos));
                    }
                    Ok(((rt.filter, rt.share_group), rt.max_qos as u8))
                })
                .collect()
        };
        let (upserts, removed) = match (conv(r.upserts), conv(r.removed)) {
            (Ok(u), Ok(d)) => (u, d),
            (Err(what), _) | (_, Err(what)) => {
                return Err(self.reject("invalid", ClusterError::Invalid { from: r.from, what }));
            }
        };
        // The lock is held while the change goes into the router's inbox,
        // so two requests of one peer reach the router in the order their
        // versions were checked.
        let mut held = p.held.lock().expect("held lock");
        if r.full || r.base_version == held.version {
            if r.full {
                self.node.metrics.resyncs_received.fetch_add(1, Relaxed);
                held.routes = upserts.len();
            } else {
                held.routes = (held.routes + upserts.len()).saturating_sub(removed.len());
            }
            held.version = r.version;
            p.resynced();
            self.node.router.push(ToRouter::RemoteRoutes(Box::new(RemoteRoutes {
                node: r.from,
                full: r.full,
                upserts,
                removed: removed.into_iter().map(|(k, _)| k).collect(),
            })));
        }
        Ok(Response::new(pb::SyncRoutesResponse { held_version: held.version }))
    }

    async fn sync_retained(
        &self,
        req: Request<pb::SyncRetainedRequest>,
    ) -> Result<Response<pb::SyncRetainedResponse>, Status> {
        let r = req.into_inner();
        self.peer(&r.from, r.incarnation)?;
        let mut writes = Vec::with_capacity(r.entries.len());
        for e in r.entries {
            match convert::retained_from_wire(e) {
                Ok(w) => writes.push(w),
                // Skipped: a retry would be just as bad.
                Err(what) => {
                    let _ = self.reject("invalid", ClusterError::Invalid { from: r.from.clone(), what });
                }
            }
        }
        let applied = writes.len() as u32;
        if self.node.router.send(ToRouter::RetainedSync(Box::new(writes))).await.is_err() {
            return Err(ClusterError::Stopped.into());
        }
        Ok(Response::new(pb::SyncRetainedResponse { applied }))
    }

    async fn takeover(&self, req: Request<pb::TakeoverRequest>) -> Result<Response<pb::TakeoverResponse>, Status> {
        let r = req.into_inner();
        self.peer(&r.from, r.incarnation)?;
        if r.client_id.is_empty() || r.client_id.contains('\0') {
            return Err(self.reject(
                "invalid",
                ClusterError::Invalid { from: r.from, what: format!("takeover of client id {:?}", r.client_id) },
            ));
        }
        let (reply, answer) = oneshot::channel();
        let client = Arc::from(r.client_id.as_str());
        if self.node.router.send(ToRouter::TakeOver { client, clean_start: r.clean_start, reply }).await.is_err() {
            return Err(ClusterError::Stopped.into());
        }
        let moved = answer.await.map_err(|_| Status::from(ClusterError::Stopped))?;
        Ok(Response::new(pb::TakeoverResponse {
            found: moved.is_some(),
            session: moved.filter(|_| !r.clean_start).map(|m| convert::session_to_wire(&m)),
        }))
    }

    async fn forward(&self, req: Request<pb::ForwardRequest>) -> Result<Response<pb::ForwardResponse>, Status> {
        let origin = self.node.dedup.origin(&req.get_ref().from);
        let taken = self.take(&origin, req.into_inner(), None).await?;
        Ok(Response::new(taken.answered(&origin).await?))
    }

    type ForwardStreamStream = tokio_stream::wrappers::ReceiverStream<Result<pb::ForwardResponse, Status>>;

    /// Batches are taken (deduplicated and handed to the router) in stream
    /// order as they arrive and answered in that order as their commits
    /// complete, so a link keeps several in flight and the store commits
    /// them together.
    async fn forward_stream(
        &self,
        req: Request<tonic::Streaming<pb::ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        let mut inbound = req.into_inner();
        let (out, rx) = tokio::sync::mpsc::channel(STREAM_WINDOW);
        let (pending_tx, mut pending) = tokio::sync::mpsc::channel::<Taken>(STREAM_WINDOW);
        // Set (under the origin's lock) once an answer failed: the stream
        // takes nothing more, so no mark passes the rolled-back one.
        let failed = Arc::new(AtomicBool::new(false));
        let svc = Service { node: self.node.clone() };
        let f = failed.clone();
        let err_out = out.clone();
        let reader = async move {
            let mut origin: Option<(String, Origin)> = None;
            loop {
                let r = match inbound.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(s) => {
                        let _ = err_out.send(Err(s)).await;
                        return;
                    }
                };
                let o = match &origin {
                    Some((name, o)) if *name == r.from => o.clone(),
                    _ => {
                        let o = svc.node.dedup.origin(&r.from);
                        origin = Some((r.from.clone(), o.clone()));
                        o
                    }
                };
                match svc.take(&o, r, Some(&f)).await {
                    Ok(t) => {
                        if pending_tx.send(t).await.is_err() {
                            return;
                        }
                    }
                    Err(s) => {
                        let _ = err_out.send(Err(s)).await;
                        return;
                    }
                }
            }
        };
        let dedup_node = self.node.clone();
        let answerer = async move {
            while let Some(t) = pending.recv().await {
                let origin = dedup_node.dedup.origin(&t.from);
                match t.answered_or_fail(&origin, &failed).await {
                    Ok(a) => {
                        if out.send(Ok(a)).await.is_err() {
                            return;
                        }
                    }
                    Err(s) => {
                        let _ = out.send(Err(s)).await;
                        return;
                    }
                }
            }
        };
        tokio::spawn(async move {
            // The answerer ends the stream on its first failure (the reader
            // is dropped with it); an ended reader leaves the answerer to
            // answer what it took.
            tokio::pin!(reader, answerer);
            tokio::select! {
                _ = &mut answerer => return,
                _ = &mut reader => {}
            }
            answerer.await;
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}
