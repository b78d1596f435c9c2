//! The MQTT load generator shared by `broker bench` and `chaosctl run`: the
//! project's MQTT codec and client, a typed workload [`Spec`], and a running
//! [`Workload`] that reports per-second [`Window`]s (sent, acknowledged and
//! received per QoS, losses, duplicates, reordering, latency).
//!
//! It does not link the broker server, so a runner can load any broker.

pub mod client;
pub mod codec;
pub mod record;
pub mod run;
pub mod spec;
pub mod stats;
mod worker;

pub use record::Window;
pub use run::{Summary, Workload};
pub use spec::{Fanout, Group, Protocol, QosMix, Reconnect, Session, Spec};
