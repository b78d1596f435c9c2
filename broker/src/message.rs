//! What the router moves around: an application message, and what a
//! connection is sent (`outbox::Outbox::send`).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::codec::{Packet, Properties, QoS};

/// One published message, shared by every subscriber it goes to.
#[derive(Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// PUBLISH properties as received, without topic alias and subscription
    /// identifiers (those belong to one hop).
    pub props: Properties,
    /// Absolute expiry (Unix seconds) from the message expiry interval.
    pub expires_at: Option<u64>,
    /// Client id of the publisher, for no-local.
    pub publisher: Option<Arc<str>>,
    /// When the broker received it, for the delivery latency histogram.
    pub received_at: Instant,
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Message {
    pub fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// `expired` at the current time, read only for messages that expire.
    pub fn expired_now(&self) -> bool {
        self.expires_at.is_some_and(|t| t <= unix_now())
    }

    /// Seconds left, for the message expiry interval sent on.
    pub fn remaining(&self, now: u64) -> Option<u32> {
        self.expires_at.map(|t| t.saturating_sub(now).max(1).min(u64::from(u32::MAX)) as u32)
    }
}

/// When a retained message was set or cleared, for last-writer-wins across
/// cluster nodes: ordered by `millis` (a hybrid logical clock: wall-clock
/// milliseconds, but past every stamp seen), then by node name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Stamp {
    pub millis: u64,
    pub node: Arc<str>,
}

/// A PUBLISH for one subscriber.
#[derive(Debug)]
pub struct Delivery {
    pub msg: Arc<Message>,
    pub qos: QoS,
    pub pid: u16,
    pub dup: bool,
    pub retain: bool,
    pub sub_ids: Vec<u32>,
}

/// What is sent to a connection.
#[derive(Debug)]
pub enum Outbound {
    /// Boxed: packets are rare next to deliveries and much larger.
    Packet(Box<Packet>),
    Deliver(Delivery),
    /// Send DISCONNECT with this reason (v5) and close.
    Close(u8),
}

impl Outbound {
    pub fn packet(p: Packet) -> Outbound {
        Outbound::Packet(Box::new(p))
    }
}
