//! Broker configuration: a TOML file, overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing config file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid fsync policy {0:?}: expected \"every-ack\" or \"group\"")]
    Fsync(String),
    #[error("invalid cluster address {0:?}: expected IP:PORT or IP (port 7000)")]
    ClusterListen(String),
    #[error("invalid seed {0:?} in join: expected HOST:PORT")]
    Seed(String),
    #[error("invalid listen backlog {0}: expected 1 to 2147483647 (listen(2) takes a C int)")]
    ListenBacklog(u32),
}

/// Port of the cluster listener when only an IP is given.
pub const DEFAULT_CLUSTER_PORT: u16 = 7000;

/// `IP:PORT`, or `IP` meaning port 7000.
pub fn parse_cluster_addr(a: &str) -> Result<SocketAddr, ConfigError> {
    a.parse::<SocketAddr>()
        .or_else(|_| a.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, DEFAULT_CLUSTER_PORT)))
        .map_err(|_| ConfigError::ClusterListen(a.to_owned()))
}

/// The largest backlog `listen(2)` can be asked for.
pub const MAX_LISTEN_BACKLOG: u32 = i32::MAX as u32;

/// When the store makes writes durable. Either way a QoS 1/2 message for a
/// persistent session is fsynced before the publisher gets its PUBACK/PUBREC;
/// the policies differ in how many writes share one fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Commit as soon as there is work; what arrives during an fsync goes
    /// into the next one. Lowest ack latency, most fsyncs.
    EveryAck,
    /// Collect writes for this long, then one commit for all of them.
    /// Fewer fsyncs under load, up to this much extra ack latency.
    Group(Duration),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub mqtt_listen: SocketAddr,
    pub http_listen: Option<SocketAddr>,
    /// Without a data directory sessions live in memory only.
    pub data_dir: Option<PathBuf>,
    pub node_name: String,
    /// "every-ack" or "group".
    pub fsync: String,
    pub group_commit_ms: u64,
    /// Largest packet accepted from clients (bytes, whole packet).
    pub max_packet_size: u32,
    /// Receive maximum announced to v5 clients: unacknowledged QoS 1/2
    /// publishes a client may have outstanding towards the broker.
    pub receive_maximum: u16,
    /// Upper bound on outgoing unacknowledged QoS 1/2 messages per client.
    pub max_inflight: u16,
    /// Upper bound on messages queued per session; beyond it they are dropped
    /// and counted.
    pub max_queued: usize,
    /// QoS 0 messages waiting in a connection's write queue before more are
    /// dropped (slow consumer).
    pub max_qos0_pending: usize,
    pub topic_alias_maximum: u16,
    /// Largest keep alive granted; 0 accepts whatever the client asks.
    pub max_keep_alive: u16,
    pub connect_timeout_ms: u64,
    /// File of `user:password` or `user:sha256:HEX` lines; absent means
    /// anonymous access.
    pub password_file: Option<PathBuf>,
    pub sys_interval_secs: u64,
    pub max_connections: usize,
    /// Connections the kernel completes and queues for the broker to accept
    /// (the MQTT listener's `listen(2)` backlog); a burst beyond it waits for
    /// the client's SYN retransmission, one second or more. Absent means
    /// `max_connections`: a burst of every connection the broker admits fits.
    /// The kernel caps it at `net.core.somaxconn`.
    pub listen_backlog: Option<u32>,
    /// Threads that run connections and the router: 1 (the default) is a
    /// single event loop, where a message crosses no thread on its way from
    /// publisher to subscribers; more spreads connections over cores.
    pub worker_threads: usize,
    /// Time slice asked of the kernel for those threads (µs, Linux ≥ 6.12),
    /// so that an incoming message preempts CPU-bound neighbours at once; 0
    /// keeps the kernel's default.
    pub sched_slice_us: u64,
    /// Cluster API (gRPC) listener, `IP:PORT` or `IP` (port 7000). The node
    /// is clustered when this or `join` is set; alone (no `join`) it waits
    /// for others to join it.
    pub cluster_listen: Option<String>,
    /// Where peers reach this node when it is not `cluster_listen` (NAT, or
    /// listening on 0.0.0.0 where peers would otherwise use the address
    /// they see the node's requests come from).
    pub cluster_advertise: Option<String>,
    /// Static seeds, `HOST:PORT` of other nodes' cluster listeners.
    pub join: Vec<String>,
    /// Heartbeat interval towards each peer.
    pub cluster_heartbeat_ms: u64,
    /// A peer not heard from for this long is suspect ...
    pub cluster_suspect_after_ms: u64,
    /// ... and for this long down (its routes and queued forwards are kept).
    pub cluster_down_after_ms: u64,
    /// Forwards queued per peer beyond which new ones are dropped (counted,
    /// logged once per episode).
    pub cluster_forward_queue: usize,
    /// A peer down for longer than this (seconds) keeps at most
    /// `cluster_down_peer_max_queued` forwards: what is beyond is dropped
    /// (oldest kept), counted and logged once per episode.
    pub cluster_down_peer_keep_secs: u64,
    pub cluster_down_peer_max_queued: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            mqtt_listen: "0.0.0.0:1883".parse().expect("constant address"),
            http_listen: None,
            data_dir: None,
            node_name: "broker".into(),
            fsync: "every-ack".into(),
            group_commit_ms: 5,
            max_packet_size: 1 << 20,
            receive_maximum: 1024,
            max_inflight: 256,
            max_queued: 100_000,
            max_qos0_pending: 10_000,
            topic_alias_maximum: 64,
            max_keep_alive: 0,
            connect_timeout_ms: 10_000,
            password_file: None,
            sys_interval_secs: 10,
            max_connections: 100_000,
            listen_backlog: None,
            worker_threads: 1,
            sched_slice_us: 100,
            cluster_listen: None,
            cluster_advertise: None,
            join: Vec::new(),
            cluster_heartbeat_ms: 500,
            cluster_suspect_after_ms: 1500,
            cluster_down_after_ms: 5000,
            cluster_forward_queue: 100_000,
            cluster_down_peer_keep_secs: 300,
            cluster_down_peer_max_queued: 10_000,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })
    }

    pub fn fsync_policy(&self) -> Result<FsyncPolicy, ConfigError> {
        match self.fsync.as_str() {
            "every-ack" => Ok(FsyncPolicy::EveryAck),
            "group" => Ok(FsyncPolicy::Group(Duration::from_millis(self.group_commit_ms.max(1)))),
            other => Err(ConfigError::Fsync(other.into())),
        }
    }

    /// The cluster listener's address, when the node is clustered.
    pub fn cluster_listen(&self) -> Result<Option<SocketAddr>, ConfigError> {
        match (&self.cluster_listen, self.join.is_empty()) {
            (None, true) => Ok(None),
            (None, false) => Ok(Some(SocketAddr::from(([0, 0, 0, 0], DEFAULT_CLUSTER_PORT)))),
            (Some(a), _) => parse_cluster_addr(a).map(Some),
        }
    }

    /// Cluster settings, when the node is clustered; `bound` is the cluster
    /// listener's actual address (port 0 in tests).
    pub fn cluster_settings(&self, bound: SocketAddr) -> Result<crate::cluster::Settings, ConfigError> {
        for s in &self.join {
            if s.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
                return Err(ConfigError::Seed(s.clone()));
            }
        }
        let advertise = match &self.cluster_advertise {
            Some(a) => parse_cluster_addr(a)?,
            None => bound,
        };
        let ms = Duration::from_millis;
        Ok(crate::cluster::Settings {
            node_name: self.node_name.clone(),
            advertise,
            mqtt_addr: self.mqtt_listen.to_string(),
            seeds: self.join.clone(),
            heartbeat: ms(self.cluster_heartbeat_ms.max(10)),
            suspect_after: ms(self.cluster_suspect_after_ms.max(1)),
            down_after: ms(self.cluster_down_after_ms.max(self.cluster_suspect_after_ms).max(1)),
            forward_queue: self.cluster_forward_queue.max(1),
            down_keep: Duration::from_secs(self.cluster_down_peer_keep_secs),
            down_max_queued: self.cluster_down_peer_max_queued.min(self.cluster_forward_queue.max(1)),
        })
    }

    /// The backlog to ask `listen(2)` for, before the kernel's cap.
    pub fn listen_backlog(&self) -> Result<u32, ConfigError> {
        match self.listen_backlog {
            Some(b) if (1..=MAX_LISTEN_BACKLOG).contains(&b) => Ok(b),
            Some(b) => Err(ConfigError::ListenBacklog(b)),
            None => Ok(u32::try_from(self.max_connections).unwrap_or(u32::MAX).clamp(1, MAX_LISTEN_BACKLOG)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_and_fsync_policies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("broker.toml");
        std::fs::write(
            &p,
            "mqtt_listen = \"127.0.0.1:1999\"\nnode_name = \"n1\"\nfsync = \"group\"\ngroup_commit_ms = 7\nmax_queued = 10\n",
        )
        .expect("write");
        let c = Config::load(&p).expect("loads");
        assert_eq!(c.mqtt_listen.port(), 1999);
        assert_eq!((c.node_name.as_str(), c.max_queued), ("n1", 10));
        assert_eq!(c.fsync_policy().expect("policy"), FsyncPolicy::Group(Duration::from_millis(7)));
        assert_eq!(Config::default().fsync_policy().expect("policy"), FsyncPolicy::EveryAck);
        std::fs::write(&p, "no_such_key = 1\n").expect("write");
        assert!(matches!(Config::load(&p), Err(ConfigError::Parse { .. })));
        let bad = Config { fsync: "sometimes".into(), ..Config::default() };
        assert!(bad.fsync_policy().is_err());
    }

    /// Every cluster option has a config-file key, and they reach the
    /// cluster's settings.
    #[test]
    fn cluster_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("broker.toml");
        std::fs::write(
            &p,
            "node_name = \"n2\"\ncluster_listen = \"127.0.0.1:7100\"\ncluster_advertise = \"10.0.0.2:7000\"\n\
             join = [\"10.0.0.1:7000\", \"n3.local:7000\"]\ncluster_heartbeat_ms = 200\n\
             cluster_suspect_after_ms = 700\ncluster_down_after_ms = 2000\ncluster_forward_queue = 500\n\
             cluster_down_peer_keep_secs = 60\ncluster_down_peer_max_queued = 50\n",
        )
        .expect("write");
        let c = Config::load(&p).expect("loads");
        let bound = c.cluster_listen().expect("addr").expect("clustered");
        assert_eq!(bound.to_string(), "127.0.0.1:7100");
        let s = c.cluster_settings(bound).expect("settings");
        assert_eq!(s.advertise.to_string(), "10.0.0.2:7000");
        assert_eq!(s.seeds, ["10.0.0.1:7000", "n3.local:7000"]);
        assert_eq!((s.heartbeat, s.suspect_after, s.down_after), (ms(200), ms(700), ms(2000)));
        assert_eq!((s.forward_queue, s.down_keep, s.down_max_queued), (500, Duration::from_secs(60), 50));
        let bad = Config { join: vec!["nohost".into()], ..c };
        assert!(matches!(bad.cluster_settings(bound), Err(ConfigError::Seed(_))));
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn listen_backlog_follows_max_connections_unless_set() {
        assert_eq!(Config::default().listen_backlog().expect("default"), 100_000);
        let c = Config { max_connections: 500, ..Config::default() };
        assert_eq!(c.listen_backlog().expect("derived"), 500);
        let c = Config { max_connections: usize::MAX, ..Config::default() };
        assert_eq!(c.listen_backlog().expect("derived"), MAX_LISTEN_BACKLOG);
        let c = Config { max_connections: 0, ..Config::default() };
        assert_eq!(c.listen_backlog().expect("derived"), 1);
        let c = Config { listen_backlog: Some(64), ..Config::default() };
        assert_eq!(c.listen_backlog().expect("set"), 64);
        for bad in [0, MAX_LISTEN_BACKLOG + 1, u32::MAX] {
            let c = Config { listen_backlog: Some(bad), ..Config::default() };
            let e = c.listen_backlog().expect_err("out of range").to_string();
            assert!(e.contains(&bad.to_string()) && e.contains("2147483647"), "{e}");
        }
    }
}
