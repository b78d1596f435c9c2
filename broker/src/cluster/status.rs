//! What an operator sees of the cluster: the `/cluster` document (HTTP) and
//! `/health`'s degraded state. The JSON's shape is a contract with the
//! topology scripts and `broker cluster status` (README, "Cluster").

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use serde::{Deserialize, Serialize};

use super::Node;
use super::members::PeerState;

/// `GET /cluster`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    pub node: String,
    pub incarnation: u64,
    pub route_version: u64,
    pub local_routes: usize,
    /// Some known peer is not up.
    pub degraded: bool,
    /// The other nodes this node knows, by name.
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub cluster_addr: String,
    /// Empty until the peer announced it (it joined this node, or a member
    /// list named it with one).
    pub mqtt_addr: String,
    /// "up", "suspect" or "down".
    pub state: String,
    /// Version of the peer's route table held here.
    pub route_version: u64,
    /// Routes of the peer held here.
    pub routes: usize,
    /// Forwards waiting for the peer.
    pub forward_queue: usize,
    pub forwards_dropped: u64,
    /// Wall-clock time of the last route sync (full table or delta) that
    /// brought the peer's table here or ours there up to date, 0 when none.
    pub last_resync_unix_ms: u64,
}

/// A handle for the HTTP endpoint: reads the cluster's live state.
#[derive(Clone)]
pub struct View {
    pub(super) node: Arc<Node>,
}

impl View {
    pub fn status(&self) -> Status {
        let node = &self.node;
        let members: Vec<Member> = node
            .members
            .all()
            .iter()
            .map(|p| {
                let held = p.held.lock().expect("held lock");
                Member {
                    name: p.name.clone(),
                    cluster_addr: p.addr(),
                    mqtt_addr: p.mqtt_addr(),
                    state: p.state(&node.settings).label().to_owned(),
                    route_version: if held.version == super::service::UNKNOWN_VERSION { 0 } else { held.version },
                    routes: held.routes,
                    forward_queue: p.queue.len(),
                    forwards_dropped: p.queue.counters.dropped.load(Relaxed),
                    last_resync_unix_ms: p.last_resync_ms.load(Relaxed),
                }
            })
            .collect();
        Status {
            node: node.settings.node_name.clone(),
            incarnation: node.incarnation,
            route_version: node.routes.version(),
            local_routes: node.routes.len(),
            degraded: members.iter().any(|m| m.state != PeerState::Up.label()),
            members,
        }
    }

    /// Names of the known peers that are not up (suspect or down).
    pub fn peers_down(&self) -> Vec<String> {
        let s = &self.node.settings;
        self.node.members.all().iter().filter(|p| p.state(s) != PeerState::Up).map(|p| p.name.clone()).collect()
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it): shown to
/// operators only, never compared by the failure detector.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
