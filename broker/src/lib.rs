//! chaosd's MQTT broker node and its load client. See architecture.md.

pub mod auth;
pub mod bench;
pub mod client;
pub mod cluster;
pub mod cluster_status;
pub mod codec;
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
