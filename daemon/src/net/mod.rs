//! Network faults: an eBPF classifier per device and direction driven by
//! pinned maps (loss, partition, steering), HTB/netem/IFB for the delay
//! family and bandwidth, and the `Driver` that applies and reverts them.
//! See architecture.md in this directory.

pub mod bpf;
pub mod driver;
pub(crate) mod maps;
pub(crate) mod netem_dist;
pub(crate) mod objects;
pub mod qdisc_tree;
pub(crate) mod rules;
pub(crate) mod shaping;
mod shutdown;
pub(crate) mod sweep;
pub(crate) mod target;
mod verify;

pub use driver::{NetConfig, NetInitError, NetworkDriver};
