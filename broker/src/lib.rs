//! chaosd's MQTT broker node and its load client. See architecture.md.

// The codec and the client live in the mqtt-workload crate (so a runner can
// load a broker without linking it); these paths keep working in here.
pub use mqtt_workload::{client, codec};

pub mod acks;
pub mod auth;
pub mod bench;
pub mod cluster;
pub mod cluster_status;
pub mod config;
pub mod conn;
pub mod http;
pub mod inbox;
pub mod message;
pub mod metrics;
pub mod outbox;
pub mod router;
pub mod sched;
pub mod server;
pub mod store;
pub mod topic;
