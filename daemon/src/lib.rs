//! chaosd: a node-level chaos daemon. A synchronous privileged core (netns,
//! netlink, BPF, cgroups, signals) behind small interfaces, and a thin async
//! gRPC shell that reaches it through dedicated threads or `block_in_place`.
//! See architecture.md.

pub(crate) mod convert;
pub(crate) mod display;
pub mod driver;
pub mod engine;
pub mod error;
pub mod experiment;
pub mod journal;
pub mod metrics;
pub mod net;
pub mod netlink;
pub mod netns;
pub mod owner;
pub mod privilege;
pub mod probe;
pub mod process;
pub mod server;
pub mod service;
pub mod spec;
pub mod stress;
pub(crate) mod tc;
pub mod tls;
pub(crate) mod wire;

/// The eBPF object built by build.rs from ebpf/chaosd-ebpf.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/chaosd.bpf.o"));

/// Version reported by `Status`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
