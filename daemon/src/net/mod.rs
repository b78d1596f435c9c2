//! Network faults: an eBPF classifier per device and direction driven by
//! pinned maps (loss, partition, steering), HTB/netem/IFB for the delay
//! family and bandwidth, and the `Driver` that applies and reverts them.
//! See architecture.md in this directory.

pub mod bpf;
pub mod driver;
pub mod maps;
pub mod netem_dist;
pub mod objects;
pub mod qdisc_tree;
pub mod rules;
pub mod shaping;
mod shutdown;
pub mod sweep;
pub mod target;
mod verify;

pub use driver::{NetConfig, NetInitError, NetworkDriver};
