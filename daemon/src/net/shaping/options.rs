//! The `TCA_OPTIONS` payloads of chaosd's shaping, byte for byte from the
//! kernel's uapi structs (include/uapi/linux/pkt_sched.h): netem with its
//! delay distribution tables, and HTB classes.

use crate::{net::netem_dist, spec::NetAction, tc};

/// struct tc_ratespec + rate: Ethernet link layer, so no rate table needed.
fn ratespec(bytes_per_sec: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[1] = 1; // TC_LINKLAYER_ETHERNET
    b[8..12].copy_from_slice(&(bytes_per_sec.min(u32::MAX as u64) as u32).to_ne_bytes());
    b
}

/// TCA_OPTIONS of an HTB class: rate = ceil = `bps` bytes/s, burst bytes.
pub(super) fn htb_class_options(bps: u64, burst: u32) -> Vec<u8> {
    const TCA_HTB_PARMS: u16 = 1;
    const TCA_HTB_RATE64: u16 = 6;
    const TCA_HTB_CEIL64: u16 = 7;
    // Buffer in psched ticks (64 ns): time to send `burst` at `bps`.
    let ticks = ((burst as u128 * 1_000_000_000 / bps.max(1) as u128) / 64).min(u32::MAX as u128) as u32;
    let quantum = (bps / 10).clamp(1600, 200_000) as u32;
    let mut parms = Vec::with_capacity(44);
    parms.extend_from_slice(&ratespec(bps));
    parms.extend_from_slice(&ratespec(bps));
    for v in [ticks, ticks, quantum, 0, 0] {
        parms.extend_from_slice(&v.to_ne_bytes());
    }
    let mut out = Vec::new();
    if bps > u32::MAX as u64 {
        out.extend(tc::nla(TCA_HTB_RATE64, &bps.to_ne_bytes()));
        out.extend(tc::nla(TCA_HTB_CEIL64, &bps.to_ne_bytes()));
    }
    out.extend(tc::nla(TCA_HTB_PARMS, &parms));
    out
}

/// netem's TCA_OPTIONS: struct tc_netem_qopt followed by attributes.
pub(crate) fn netem_options(action: &NetAction) -> Vec<u8> {
    const TCA_NETEM_CORR: u16 = 1;
    const TCA_NETEM_DELAY_DIST: u16 = 2;
    const TCA_NETEM_REORDER: u16 = 3;
    const TCA_NETEM_CORRUPT: u16 = 4;
    const TCA_NETEM_LATENCY64: u16 = 10;
    const TCA_NETEM_JITTER64: u16 = 11;
    let pct = |p: f64| (p / 100.0 * u32::MAX as f64).round() as u32;
    let (mut latency, mut jitter, mut dup, mut corr) = (0u64, 0u64, 0u32, [0u32; 3]);
    // netem reorders only with a gap: with gap 0 every packet is delayed and
    // none goes out at once. tc(8) sets gap 1 when `reorder` is given.
    let mut gap = 0u32;
    let mut extra = Vec::new();
    match action {
        NetAction::Delay { latency: l, jitter: j, correlation, distribution } => {
            latency = l.as_nanos() as u64;
            jitter = j.as_nanos() as u64;
            corr[0] = pct(*correlation);
            if let Some(table) = distribution.and_then(netem_dist::table_bytes) {
                extra.extend(tc::nla(TCA_NETEM_DELAY_DIST, &table));
            }
        }
        NetAction::Duplicate { percent, correlation } => {
            dup = pct(*percent);
            corr[2] = pct(*correlation);
        }
        NetAction::Corrupt { percent, correlation } => {
            let mut b = Vec::new();
            b.extend_from_slice(&pct(*percent).to_ne_bytes());
            b.extend_from_slice(&pct(*correlation).to_ne_bytes());
            extra.extend(tc::nla(TCA_NETEM_CORRUPT, &b));
        }
        NetAction::Reorder { percent, correlation, latency: l } => {
            latency = l.as_nanos() as u64;
            gap = 1;
            let mut b = Vec::new();
            b.extend_from_slice(&pct(*percent).to_ne_bytes());
            b.extend_from_slice(&pct(*correlation).to_ne_bytes());
            extra.extend(tc::nla(TCA_NETEM_REORDER, &b));
        }
        _ => {}
    }
    // Queue limit: enough packets for ~12 Gbit/s of 1500-byte packets
    // during the longest delay, so netem itself never drops.
    let hold_s = (latency + jitter) as f64 / 1e9;
    let limit = ((hold_s * 1_000_000.0) as u64).clamp(10_000, 10_000_000) as u32;
    let ticks = |ns: u64| (ns / 64).min(u32::MAX as u64) as u32;
    let mut b = Vec::new();
    // latency, limit, loss, gap, duplicate, jitter
    for v in [ticks(latency), limit, 0, gap, dup, ticks(jitter)] {
        b.extend_from_slice(&v.to_ne_bytes());
    }
    let mut c = Vec::new();
    for v in corr {
        c.extend_from_slice(&v.to_ne_bytes());
    }
    b.extend(tc::nla(TCA_NETEM_CORR, &c));
    b.extend(tc::nla(TCA_NETEM_LATENCY64, &(latency as i64).to_ne_bytes()));
    b.extend(tc::nla(TCA_NETEM_JITTER64, &(jitter as i64).to_ne_bytes()));
    b.extend(extra);
    b
}
