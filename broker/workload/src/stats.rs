//! The measurement header every payload carries, and per-subscriber
//! duplicate / reordering detection.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Payload header written by publishers: publisher, QoS, sequence number (per
/// publisher and QoS), send time in nanoseconds since the Unix epoch.
pub const HEADER: usize = 24;

pub fn encode_header(buf: &mut [u8], publisher: u32, qos: u8, seq: u64, ts_ns: u64) {
    buf[0..4].copy_from_slice(&publisher.to_be_bytes());
    buf[4..8].copy_from_slice(&u32::from(qos).to_be_bytes());
    buf[8..16].copy_from_slice(&seq.to_be_bytes());
    buf[16..24].copy_from_slice(&ts_ns.to_be_bytes());
}

pub fn decode_header(b: &[u8]) -> Option<(u32, u8, u64, u64)> {
    let h = b.get(..HEADER)?;
    let p = u32::from_be_bytes(h[0..4].try_into().ok()?);
    let q = u32::from_be_bytes(h[4..8].try_into().ok()?);
    let s = u64::from_be_bytes(h[8..16].try_into().ok()?);
    let t = u64::from_be_bytes(h[16..24].try_into().ok()?);
    Some((p, u8::try_from(q).ok().filter(|q| *q <= 2)?, s, t))
}

/// What one subscriber saw of one (publisher, QoS) stream.
#[derive(Default)]
struct Stream {
    seen: Vec<u64>,
    max: Option<u64>,
}

/// How a receipt counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// First copy; `out_of_order` when a later sequence number came first.
    Fresh {
        out_of_order: bool,
    },
    Duplicate,
}

/// One subscriber's memory of the sequence numbers it has seen.
#[derive(Default)]
pub struct SubStats {
    streams: HashMap<(u32, u8), Stream>,
}

impl SubStats {
    pub fn record(&mut self, publisher: u32, qos: u8, seq: u64) -> Receipt {
        let s = self.streams.entry((publisher, qos)).or_default();
        let (w, bit) = ((seq / 64) as usize, seq % 64);
        if s.seen.len() <= w {
            s.seen.resize(w + 1, 0);
        }
        if s.seen[w] & (1 << bit) != 0 {
            return Receipt::Duplicate;
        }
        s.seen[w] |= 1 << bit;
        let out_of_order = s.max.is_some_and(|m| seq < m);
        s.max = Some(s.max.map_or(seq, |m| m.max(seq)));
        Receipt::Fresh { out_of_order }
    }
}

#[derive(Debug, Serialize, Deserialize, Default, Clone, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    /// Percentiles of microsecond samples, in milliseconds; sorts `us`.
    pub fn of(us: &mut [u32]) -> Latency {
        us.sort_unstable();
        Latency { p50: pct(us, 0.50), p95: pct(us, 0.95), p99: pct(us, 0.99), max: pct(us, 1.0) }
    }
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

#[derive(Debug, Serialize, Deserialize, Default, Clone)]
pub struct QosReport {
    pub sent: u64,
    /// PUBACK/PUBCOMP received by publishers (QoS 0: same as sent).
    pub acked: u64,
    /// Copies the subscribers should get: each message times the
    /// subscribers whose filter covers it.
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub throughput_msgs_per_s: f64,
    pub latency_ms: Latency,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_duplicates_and_reordering() {
        let mut s = SubStats::default();
        let got: Vec<Receipt> = [0, 1, 3, 2, 3, 5].into_iter().map(|seq| s.record(0, 1, seq)).collect();
        let fresh = |o| Receipt::Fresh { out_of_order: o };
        assert_eq!(got, vec![fresh(false), fresh(false), fresh(false), fresh(true), Receipt::Duplicate, fresh(false)]);
        // Another stream is independent.
        assert_eq!(s.record(1, 1, 3), fresh(false));
        let mut h = [0u8; HEADER];
        encode_header(&mut h, 3, 2, 99, 12345);
        assert_eq!(decode_header(&h), Some((3, 2, 99, 12345)));
        assert_eq!(decode_header(&h[..10]), None);
        assert_eq!(Latency::of(&mut [300, 100, 200]).p50, 0.2);
    }
}
