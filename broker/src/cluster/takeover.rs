//! Session takeover across nodes: a client connecting here takes its
//! session (or, on a clean start, just its client id) from whichever node
//! had it.
//!
//! Before the CONNECT reaches the router, the connection asks every peer
//! that is not down, at once, to give the session up (`Takeover`); a peer
//! that had it closes the old connection (0x8E), handles its will and
//! answers with the session, which the router installs as if restored from
//! disk. A peer that does not answer within `TIMEOUT` (a partition not yet
//! detected) is skipped: the client is served with what this node has.

use std::sync::Arc;
use std::time::Duration;

use chaos_proto::broker::v1 as pb;
use chaos_proto::broker::v1::cluster_client::ClusterClient;
use tokio::task::JoinSet;

use super::members::PeerState;
use super::{Node, convert};
use crate::inbox::MovedSession;

/// How long a CONNECT waits for a peer's answer.
const TIMEOUT: Duration = Duration::from_secs(2);

pub async fn take(node: &Arc<Node>, client: &str, clean_start: bool) -> Option<Box<MovedSession>> {
    let mut calls = JoinSet::new();
    for p in node.members.all() {
        if p.state(&node.settings) == PeerState::Down {
            continue;
        }
        let Some(ch) = p.channel() else { continue };
        let req = pb::TakeoverRequest {
            from: node.settings.node_name.clone(),
            incarnation: node.incarnation,
            client_id: client.to_owned(),
            clean_start,
        };
        calls.spawn(async move {
            let r = tokio::time::timeout(TIMEOUT, ClusterClient::new(ch).takeover(req)).await;
            (p.name.clone(), r)
        });
    }
    let mut moved = None;
    while let Some(r) = calls.join_next().await {
        let Ok((peer, r)) = r else { continue };
        match r {
            Ok(Ok(resp)) => {
                let resp = resp.into_inner();
                let Some(state) = resp.session.filter(|_| resp.found && !clean_start) else { continue };
                match convert::session_from_wire(state) {
                    Ok(s) if moved.is_none() => {
                        tracing::info!(%client, %peer, messages = s.entries.len(), "session taken over from peer");
                        moved = Some(Box::new(s));
                    }
                    Ok(_) => tracing::warn!(%client, %peer, "a second node had the session too: its copy is dropped"),
                    Err(e) => tracing::warn!(%client, %peer, error = %e, "session from peer unreadable: dropped"),
                }
            }
            Ok(Err(s)) => tracing::warn!(%client, %peer, error = %s, "takeover refused by peer: connecting without it"),
            Err(_) => tracing::warn!(%client, %peer, "peer did not answer the takeover in time: connecting without it"),
        }
    }
    moved
}
