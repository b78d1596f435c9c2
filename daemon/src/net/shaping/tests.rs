use std::time::Duration;

use super::*;
use crate::spec::Distribution;

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
}

#[test]
fn reorder_sets_a_gap_so_that_some_packets_go_at_once() {
    let gap = |a: &NetAction| u32::from_ne_bytes(netem_options(a)[12..16].try_into().unwrap());
    let reorder = NetAction::Reorder { percent: 50.0, correlation: 0.0, latency: Duration::from_millis(100) };
    assert_eq!(gap(&reorder), 1, "without a gap netem delays every packet");
    let delay = NetAction::Delay {
        latency: Duration::from_millis(100),
        jitter: Duration::ZERO,
        correlation: 0.0,
        distribution: None,
    };
    assert_eq!(gap(&delay), 0);
}

#[test]
fn netem_options_carry_latency_jitter_and_a_limit_that_does_not_drop() {
    let a = NetAction::Delay {
        latency: Duration::from_millis(100),
        jitter: Duration::from_millis(20),
        correlation: 50.0,
        distribution: None,
    };
    let b = netem_options(&a);
    // tc_netem_qopt: latency and jitter in 64 ns ticks, limit in packets.
    assert_eq!(u32_at(&b, 0), 100_000_000 / 64);
    assert_eq!(u32_at(&b, 20), 20_000_000 / 64);
    // 120 ms at ~1M packets/s.
    assert_eq!(u32_at(&b, 4), 120_000);
    // TCA_NETEM_CORR follows: delay correlation ~50%.
    assert_eq!(u16::from_ne_bytes([b[26], b[27]]), 1);
    assert_eq!(u32_at(&b, 28), (0.5 * u32::MAX as f64).round() as u32);
}

#[test]
fn a_delay_distribution_travels_as_netems_table() {
    // Attributes after the 24-byte tc_netem_qopt: (len, type) headers.
    let attrs = |b: &[u8]| {
        let mut out = Vec::new();
        let mut at = 24;
        while at + 4 <= b.len() {
            let len = u16::from_ne_bytes([b[at], b[at + 1]]) as usize;
            out.push((u16::from_ne_bytes([b[at + 2], b[at + 3]]), len - 4));
            at += (len + 3) & !3;
        }
        out
    };
    let delay = |distribution| NetAction::Delay {
        latency: Duration::from_millis(100),
        jitter: Duration::from_millis(20),
        correlation: 0.0,
        distribution,
    };
    assert!(!attrs(&netem_options(&delay(None))).iter().any(|(t, _)| *t == 2), "uniform: no table");
    assert!(!attrs(&netem_options(&delay(Some(Distribution::Uniform)))).iter().any(|(t, _)| *t == 2));
    for d in [Distribution::Normal, Distribution::Pareto, Distribution::ParetoNormal] {
        let a = attrs(&netem_options(&delay(Some(d))));
        assert!(a.contains(&(2, 4096 * 2)), "{d:?}: TCA_NETEM_DELAY_DIST with 4,096 samples in {a:?}");
    }
}

#[test]
fn htb_class_rate_is_ethernet_aware_and_64_bit_when_needed() {
    let b = htb_class_options(125_000, 3000);
    // Only TCA_HTB_PARMS for a rate that fits 32 bits.
    assert_eq!(u16::from_ne_bytes([b[2], b[3]]), 1);
    assert_eq!(b[4 + 1], 1, "TC_LINKLAYER_ETHERNET");
    assert_eq!(u32_at(&b, 4 + 8), 125_000);
    let big = htb_class_options(UNSHAPED_BPS * 100, 200_000);
    assert_eq!(u16::from_ne_bytes([big[2], big[3]]), 6, "TCA_HTB_RATE64 first");
}

#[test]
fn classids_sit_under_chaosd_htb_handle() {
    assert_eq!(classid(1), 0xc4a0_0002);
    assert_eq!(ifb_name(12345).len(), 15);
}
