//! What the router is sent, and by whom: connections (`conn`), the router's
//! own ticker and the cluster (`cluster`). A module of its own so that none
//! of the router's producers imports the router, nor the router them: the
//! cluster talks to the router through the same channel as connections do.

mod channel;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tokio::sync::oneshot;

pub use channel::{CAPACITY, Closed, Receiver, Sender, inbox};

use crate::codec::{ConnAck, Connect, Publish, Subscribe, Unsubscribe, Version};
use crate::outbox::Outbox;

/// Messages from connections. Every one names the connection, so requests
/// from a connection that has been taken over are ignored. A cluster layer
/// would add variants for publishes and routes from other nodes. Packets
/// with properties are boxed: unboxed, every message (a PUBACK too) took the
/// size of a v5 `Publish` (about 500 bytes), copied several times on its way
/// through the channel (callgrind: about a tenth of the broker's instructions
/// per message went to `memcpy`).
pub enum ToRouter {
    Connect {
        conn: ConnHandle,
        req: Box<ConnectReq>,
        reply: oneshot::Sender<()>,
    },
    Publish {
        conn: u64,
        client: Arc<str>,
        publish: Box<Publish>,
    },
    PubAck {
        conn: u64,
        client: Arc<str>,
        pid: u16,
    },
    PubRec {
        conn: u64,
        client: Arc<str>,
        pid: u16,
        code: u8,
    },
    PubRel {
        conn: u64,
        client: Arc<str>,
        pid: u16,
    },
    PubComp {
        conn: u64,
        client: Arc<str>,
        pid: u16,
    },
    Subscribe {
        conn: u64,
        client: Arc<str>,
        sub: Box<Subscribe>,
    },
    Unsubscribe {
        conn: u64,
        client: Arc<str>,
        unsub: Box<Unsubscribe>,
    },
    /// Routes of another node (`cluster::service`): a full table replaces
    /// what the router holds for that node, a delta amends it.
    RemoteRoutes(Box<RemoteRoutes>),
    /// Publishes forwarded by another node, for the local sessions only.
    Forwarded(Box<Forwarded>),
    /// Shared-group messages taken back from a down peer's forward queue,
    /// to be placed again on members that are up.
    Reassign(Box<Vec<crate::cluster::Reassigned>>),
    /// Retained writes replicated from a peer: (topic, stamp, message or
    /// None when cleared).
    RetainedSync(Box<Vec<(String, crate::message::Stamp, Option<crate::message::Message>)>>),
    /// Another node takes the client's session over (`cluster::takeover`):
    /// close the connection with 0x8E, will as on a local takeover, then
    /// answer with the session (None when there was none, or on a clean
    /// start, which ends it).
    TakeOver {
        client: Arc<str>,
        clean_start: bool,
        reply: oneshot::Sender<Option<Box<MovedSession>>>,
    },
    /// Four times a second (`TICK`): expired sessions, delayed wills,
    /// expired retained messages, gauges and `$SYS`.
    Tick,
    /// The connection ended. `publish_will` is false after a normal
    /// DISCONNECT; `session_expiry` is the v5 DISCONNECT's new interval.
    Disconnected {
        conn: u64,
        client: Arc<str>,
        publish_will: bool,
        session_expiry: Option<u32>,
    },
}

/// Publishes forwarded by `origin`; `done` is answered once they are handed
/// to the local sessions and, on a node with a store, once they (for
/// persistent sessions) and the deduplication `marks` are durable, in one
/// commit; dropped if the store failed.
pub struct Forwarded {
    pub origin: Arc<str>,
    pub msgs: Vec<FromPeer>,
    /// (origin incarnation, highest message id) routed by this batch.
    pub marks: Vec<(u64, u64)>,
    pub done: oneshot::Sender<()>,
}

/// A CONNECT as the router gets it.
pub struct ConnectReq {
    pub connect: Connect,
    /// Filled in by the router (session present) and sent by it.
    pub connack: ConnAck,
    /// The session, when another node handed it over.
    pub moved: Option<Box<MovedSession>>,
}

/// A session moving between nodes: what a restart would restore
/// (`router::session::Session::export` / `import`).
#[derive(Debug, Default)]
pub struct MovedSession {
    pub meta: Option<crate::store::record::SessionMeta>,
    /// (sequence number, entry, sent to the client already).
    pub entries: Vec<(u64, crate::store::record::Entry, bool)>,
    pub incoming_qos2: Vec<u16>,
    pub next_seq: u64,
}

/// A publish forwarded by its publishing node.
#[derive(Debug)]
pub struct FromPeer {
    pub msg: crate::message::Message,
    /// This node's shared groups (filter, group) the message is for.
    pub shared: Vec<(String, String)>,
}

/// A peer's routes: (filter, share group or "") with the highest QoS of its
/// subscriptions there.
#[derive(Debug)]
pub struct RemoteRoutes {
    pub node: String,
    pub full: bool,
    pub upserts: Vec<((String, String), u8)>,
    pub removed: Vec<(String, String)>,
}

/// The router's handle on a live connection.
#[derive(Clone)]
pub struct ConnHandle {
    pub id: u64,
    pub tx: Arc<Outbox>,
    pub version: Version,
    /// Outgoing window: the client's receive maximum, capped by config.
    pub receive_max: u16,
    /// The client's maximum packet size.
    pub max_packet: u32,
    /// QoS 0 deliveries not yet written (decremented by the outbox).
    pub qos0_pending: Arc<AtomicUsize>,
    /// Acks waiting for a store commit or peers' acks of forwards; later
    /// acks queue behind them so they stay in order (MQTT 4.6).
    pub acks: Arc<crate::acks::AckQueue>,
    /// Set by the router when this connection's publish went into a
    /// peer's forward queue that is filling up: the reader waits for it to
    /// drain before it reads more (backpressure instead of drops).
    pub throttle: Arc<std::sync::atomic::AtomicBool>,
}
