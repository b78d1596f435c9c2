//! What a workload is: typed, checked once, shared by `broker bench` and
//! `chaosctl run`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::Version;

/// MQTT protocol of every client of the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// MQTT 3.1.1.
    V3,
    /// MQTT 5.0.
    V5,
}

impl Protocol {
    pub fn version(self) -> Version {
        match self {
            Protocol::V3 => Version::V311,
            Protocol::V5 => Version::V5,
        }
    }
}

/// Share of messages published at each QoS, in percent; adds up to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosMix {
    pub qos0: u32,
    pub qos1: u32,
    pub qos2: u32,
}

impl QosMix {
    pub fn as_array(self) -> [u32; 3] {
        [self.qos0, self.qos1, self.qos2]
    }
}

impl Default for QosMix {
    fn default() -> Self {
        QosMix { qos0: 40, qos1: 50, qos2: 10 }
    }
}

/// Which topics a subscriber takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fanout {
    /// Subscriber j takes topic j % topics.
    #[default]
    Split,
    /// Every subscriber takes every topic.
    All,
}

/// Clean sessions (state dropped on disconnect) or persistent ones (clean
/// session 0 / session expiry one hour), so QoS 1/2 survive a reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Session {
    #[default]
    Clean,
    Persistent,
}

/// How a client that lost its connection tries again: exponential backoff
/// from `initial` up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconnect {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect { initial: Duration::from_millis(100), max: Duration::from_secs(2) }
    }
}

/// `count` clients connected to `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub addr: SocketAddr,
    pub count: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    pub protocol: Protocol,
    pub publishers: Vec<Group>,
    pub subscribers: Vec<Group>,
    /// Messages per second per publisher; 0: as fast as `inflight` allows.
    pub rate: f64,
    pub qos_mix: QosMix,
    /// Distinct topics; publisher i publishes on topic i % topics (0: one
    /// per publisher).
    pub topics: usize,
    pub fanout: Fanout,
    /// Payload bytes (at least the 24-byte measurement header).
    pub payload: usize,
    pub session: Session,
    pub reconnect: Reconnect,
    /// Unacknowledged QoS 1/2 messages per publisher.
    pub inflight: usize,
    /// Topic prefix; a unique one keeps runs apart.
    pub prefix: String,
    pub id_prefix: String,
}

impl Spec {
    /// A workload of `publishers` and `subscribers` on one broker.
    pub fn single(addr: SocketAddr, publishers: usize, subscribers: usize) -> Spec {
        Spec {
            protocol: Protocol::V5,
            publishers: vec![Group { addr, count: publishers }],
            subscribers: vec![Group { addr, count: subscribers }],
            rate: 100.0,
            qos_mix: QosMix::default(),
            topics: 0,
            fanout: Fanout::Split,
            payload: 64,
            session: Session::Clean,
            reconnect: Reconnect::default(),
            inflight: 100,
            prefix: "bench".into(),
            id_prefix: "bench".into(),
        }
    }

    /// Refuses what cannot run, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        let mix = self.qos_mix.as_array();
        if mix.iter().sum::<u32>() != 100 {
            return Err(format!(
                "qos_mix adds up to {}, not 100: give the percent of QoS 0, 1 and 2 messages, e.g. 40/50/10",
                mix.iter().sum::<u32>()
            ));
        }
        if self.publisher_count() == 0 || self.subscriber_count() == 0 {
            return Err("the workload needs at least one publisher and one subscriber".into());
        }
        for g in self.publishers.iter().chain(&self.subscribers) {
            if g.addr.port() == 0 {
                return Err(format!("broker address {} has port 0: give the broker's MQTT port", g.addr));
            }
        }
        if !(self.rate.is_finite() && self.rate >= 0.0) {
            return Err(format!("rate {} is not a number of messages per second >= 0", self.rate));
        }
        if self.inflight == 0 {
            return Err("inflight must be at least 1".into());
        }
        if self.payload > 256 << 20 {
            return Err(format!("payload {} is larger than MQTT's 256 MiB", self.payload));
        }
        if self.reconnect.initial.is_zero() || self.reconnect.max < self.reconnect.initial {
            return Err("reconnect: initial must be > 0 and max >= initial".into());
        }
        Ok(())
    }

    pub fn publisher_count(&self) -> usize {
        self.publishers.iter().map(|g| g.count).sum()
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.iter().map(|g| g.count).sum()
    }

    pub fn topic_count(&self) -> usize {
        if self.topics == 0 { self.publisher_count().max(1) } else { self.topics }
    }

    /// Whether subscriber `s` receives what publisher `p` publishes.
    pub fn covers(&self, s: usize, p: usize) -> bool {
        let t = self.topic_count();
        self.fanout == Fanout::All || s % t == p % t
    }

    /// How many subscribers receive each message of publisher `p`.
    pub fn fanout_of(&self, p: usize) -> u64 {
        (0..self.subscriber_count()).filter(|s| self.covers(*s, p)).count() as u64
    }

    pub fn topic_of(&self, p: usize) -> String {
        format!("{}/{}", self.prefix, p % self.topic_count())
    }

    pub fn filter_of(&self, s: usize) -> String {
        match self.fanout {
            Fanout::All => format!("{}/#", self.prefix),
            Fanout::Split => format!("{}/{}", self.prefix, s % self.topic_count()),
        }
    }

    /// Address of the i-th client of `groups`.
    pub fn addr_of(groups: &[Group], mut i: usize) -> Option<SocketAddr> {
        for g in groups {
            if i < g.count {
                return Some(g.addr);
            }
            i -= g.count;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_problem() {
        let a: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        let mut s = Spec::single(a, 2, 3);
        assert!(s.validate().is_ok());
        s.qos_mix = QosMix { qos0: 50, qos1: 50, qos2: 10 };
        assert!(s.validate().unwrap_err().contains("adds up to 110"));
        let mut s = Spec::single("127.0.0.1:0".parse().unwrap(), 1, 1);
        assert!(s.validate().unwrap_err().contains("port 0"));
        s.publishers[0].count = 0;
        assert!(s.validate().is_err());
    }

    #[test]
    fn split_and_all_fanout() {
        let a: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        let mut s = Spec::single(a, 2, 3);
        // Subscriber 2 shares topic 0 with subscriber 0.
        assert_eq!((s.fanout_of(0), s.fanout_of(1)), (2, 1));
        s.fanout = Fanout::All;
        assert_eq!(s.fanout_of(1), 3);
        let b: SocketAddr = "127.0.0.2:1883".parse().unwrap();
        s.subscribers = vec![Group { addr: a, count: 1 }, Group { addr: b, count: 2 }];
        assert_eq!(Spec::addr_of(&s.subscribers, 2), Some(b));
        assert_eq!(Spec::addr_of(&s.subscribers, 3), None);
    }
}
