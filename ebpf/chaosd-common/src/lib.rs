//! Types shared by chaosd's eBPF programs and the daemon. Every map key and
//! value is `#[repr(C)]`, `Copy`, with explicit padding, so both sides agree
//! on the layout byte for byte.
#![no_std]

/// Index of the heartbeat slot in the `CHAOSD_CONTROL` array map.
pub const CONTROL_HEARTBEAT: u32 = 0;

/// Global control block: the daemon refreshes `heartbeat_ns` (CLOCK_BOOTTIME,
/// as `bpf_ktime_get_boot_ns`) and the programs ignore every rule once it is
/// older than `grace_ns` (dead man's switch).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    pub heartbeat_ns: u64,
    pub grace_ns: u64,
}

#[cfg(feature = "user")]
// SAFETY: repr(C), only integer fields, no padding.
unsafe impl aya::Pod for Control {}
