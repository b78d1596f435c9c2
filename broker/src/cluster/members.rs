//! Membership: the peers this node knows, and the failure detector.
//!
//! A peer's state is read from the monotonic time of the last answer or
//! request it sent (`Instant`, never the wall clock, so a clock jump on
//! either node changes nothing): up while heard within `suspect_after`,
//! suspect until `down_after`, then down. A down peer keeps its routes and
//! its forward queue: what is queued for it goes out when it is back.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Settings;
use super::forward::PeerQueue;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    Up,
    Suspect,
    Down,
}

impl PeerState {
    pub const ALL: [PeerState; 3] = [PeerState::Up, PeerState::Suspect, PeerState::Down];

    pub fn label(self) -> &'static str {
        match self {
            PeerState::Up => "up",
            PeerState::Suspect => "suspect",
            PeerState::Down => "down",
        }
    }
}

/// What this node holds of a peer's routes: they belong to one incarnation
/// of the peer, at one version of its table.
#[derive(Debug, Default)]
pub struct Held {
    pub incarnation: u64,
    pub version: u64,
    pub routes: usize,
}

pub struct Peer {
    pub name: String,
    /// Where its Cluster service is reached, and its incarnation, as it
    /// last joined (or as a member list named it).
    pub addr: Mutex<String>,
    /// Its MQTT listener as it announced it ("" until then).
    pub mqtt_addr: Mutex<String>,
    pub incarnation: AtomicU64,
    /// Wall-clock ms of the last route sync either way (for operators).
    pub last_resync_ms: AtomicU64,
    heard: Mutex<Option<Instant>>,
    /// When this node learned of it: "silent since" for a peer never heard.
    known_since: Instant,
    /// Its routes held here (receiving side).
    pub held: Mutex<Held>,
    /// Our route version that the peer confirmed holding (sending side).
    pub acked_version: AtomicU64,
    /// Version of our retained table the peer holds (sending side;
    /// u64::MAX: unknown, it gets the whole set).
    pub retained_acked: AtomicU64,
    /// Forwards waiting for it.
    pub queue: PeerQueue,
    pub link: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Our link's last attempt to join it failed (it is down or away): a
    /// restarted node does not wait for its routes (server::run_node).
    pub unanswered: std::sync::atomic::AtomicBool,
    /// (address, channel) for requests beside the link's (`channel`).
    rpc: Mutex<Option<(String, tonic::transport::Channel)>>,
}

impl Peer {
    pub fn new(name: &str, addr: &str, incarnation: u64, cap: usize) -> Peer {
        Peer {
            name: name.to_owned(),
            addr: Mutex::new(addr.to_owned()),
            mqtt_addr: Mutex::new(String::new()),
            incarnation: AtomicU64::new(incarnation),
            last_resync_ms: AtomicU64::new(0),
            heard: Mutex::new(None),
            known_since: Instant::now(),
            held: Mutex::new(Held::default()),
            acked_version: AtomicU64::new(u64::MAX),
            retained_acked: AtomicU64::new(u64::MAX),
            queue: PeerQueue::new(cap),
            link: Mutex::new(None),
            unanswered: std::sync::atomic::AtomicBool::new(false),
            rpc: Mutex::new(None),
        }
    }

    pub fn heard(&self) {
        *self.heard.lock().expect("heard lock") = Some(Instant::now());
    }

    /// Time since the peer was last heard (monotonic).
    pub fn silent_for(&self) -> std::time::Duration {
        self.heard.lock().expect("heard lock").unwrap_or(self.known_since).elapsed()
    }

    pub fn state(&self, s: &Settings) -> PeerState {
        match *self.heard.lock().expect("heard lock") {
            Some(t) if t.elapsed() < s.suspect_after => PeerState::Up,
            Some(t) if t.elapsed() < s.down_after => PeerState::Suspect,
            _ => PeerState::Down,
        }
    }

    /// A channel for requests beside the link's (takeovers), connected
    /// lazily and kept while the peer's address stays.
    pub fn channel(&self) -> Option<tonic::transport::Channel> {
        let addr = self.addr();
        let mut ch = self.rpc.lock().expect("rpc lock");
        if let Some((a, c)) = ch.as_ref()
            && *a == addr
        {
            return Some(c.clone());
        }
        let c = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        *ch = Some((addr, c.clone()));
        Some(c)
    }

    pub fn addr(&self) -> String {
        self.addr.lock().expect("addr lock").clone()
    }

    pub fn mqtt_addr(&self) -> String {
        self.mqtt_addr.lock().expect("mqtt addr lock").clone()
    }

    /// Records the MQTT address a peer announced (an empty one says nothing).
    pub fn set_mqtt_addr(&self, a: &str) {
        if !a.is_empty() {
            a.clone_into(&mut self.mqtt_addr.lock().expect("mqtt addr lock"));
        }
    }

    pub fn resynced(&self) {
        self.last_resync_ms.store(super::status::unix_ms(), std::sync::atomic::Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Members {
    peers: Mutex<HashMap<String, Arc<Peer>>>,
}

impl Members {
    pub fn get(&self, name: &str) -> Option<Arc<Peer>> {
        self.peers.lock().expect("members lock").get(name).cloned()
    }

    /// Returns the peer and whether it is new.
    pub fn get_or_insert(&self, name: &str, addr: &str, incarnation: u64, cap: usize) -> (Arc<Peer>, bool) {
        let mut m = self.peers.lock().expect("members lock");
        if let Some(p) = m.get(name) {
            return (p.clone(), false);
        }
        let p = Arc::new(Peer::new(name, addr, incarnation, cap));
        m.insert(name.to_owned(), p.clone());
        (p, true)
    }

    pub fn all(&self) -> Vec<Arc<Peer>> {
        let mut v: Vec<_> = self.peers.lock().expect("members lock").values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn states(&self, s: &Settings) -> Vec<(String, PeerState)> {
        self.all().iter().map(|p| (p.name.clone(), p.state(s))).collect()
    }
}
