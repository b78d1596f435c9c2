//! Per-subscriber bookkeeping and the final per-QoS report.

use std::collections::HashMap;

use serde::Serialize;

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
    unique: u64,
    max: Option<u64>,
    dup: u64,
    ooo: u64,
}

#[derive(Default)]
pub struct SubStats {
    streams: HashMap<(u32, u8), Stream>,
    pub latency_us: [Vec<u32>; 3],
    pub unique: u64,
}

impl SubStats {
    pub fn record(&mut self, publisher: u32, qos: u8, seq: u64, latency_us: u32) {
        let s = self.streams.entry((publisher, qos)).or_default();
        let (w, bit) = ((seq / 64) as usize, seq % 64);
        if s.seen.len() <= w {
            s.seen.resize(w + 1, 0);
        }
        if s.seen[w] & (1 << bit) != 0 {
            s.dup += 1;
            return;
        }
        s.seen[w] |= 1 << bit;
        s.unique += 1;
        self.unique += 1;
        if s.max.is_some_and(|m| seq < m) {
            s.ooo += 1;
        }
        s.max = Some(s.max.map_or(seq, |m| m.max(seq)));
        self.latency_us[usize::from(qos.min(2))].push(latency_us);
    }
}

#[derive(Debug, Serialize, Default, Clone)]
pub struct Latency {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Serialize, Default, Clone)]
pub struct QosReport {
    pub sent: u64,
    /// PUBACK/PUBCOMP received by publishers (QoS 0: same as sent).
    pub acked: u64,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub throughput_msgs_per_s: f64,
    pub latency_ms: Latency,
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

/// Builds the per-QoS report. `sent[p][q]` is what publisher p sent at QoS
/// q; `covers(s, p)` says whether subscriber s should receive publisher p.
pub fn report(
    subs: &[SubStats],
    sent: &[[u64; 3]],
    acked: &[[u64; 3]],
    covers: &dyn Fn(usize, usize) -> bool,
    window_s: f64,
) -> [QosReport; 3] {
    let mut out: [QosReport; 3] = Default::default();
    for (q, r) in out.iter_mut().enumerate() {
        r.sent = sent.iter().map(|s| s[q]).sum();
        r.acked = acked.iter().map(|s| s[q]).sum();
        let mut lat: Vec<u32> = Vec::new();
        for (si, st) in subs.iter().enumerate() {
            for (pi, ps) in sent.iter().enumerate() {
                if !covers(si, pi) {
                    continue;
                }
                r.expected += ps[q];
                if let Some(s) = st.streams.get(&(pi as u32, q as u8)) {
                    r.received += s.unique;
                    r.duplicated += s.dup;
                    r.out_of_order += s.ooo;
                    // Only sequence numbers that were sent count.
                    r.lost += ps[q].saturating_sub(s.unique);
                } else {
                    r.lost += ps[q];
                }
            }
            lat.extend_from_slice(&st.latency_us[q]);
        }
        lat.sort_unstable();
        r.latency_ms =
            Latency { p50: pct(&lat, 0.50), p95: pct(&lat, 0.95), p99: pct(&lat, 0.99), max: pct(&lat, 1.0) };
        r.throughput_msgs_per_s = if window_s > 0.0 { r.received as f64 / window_s } else { 0.0 };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_loss_duplicates_and_reordering() {
        let mut s = SubStats::default();
        for seq in [0, 1, 3, 2, 3, 5] {
            s.record(0, 1, seq, 100);
        }
        let r = report(&[s], &[[0, 7, 0]], &[[0, 7, 0]], &|_, _| true, 1.0);
        assert_eq!((r[1].expected, r[1].received, r[1].lost, r[1].duplicated, r[1].out_of_order), (7, 5, 2, 1, 1));
        assert_eq!(r[1].latency_ms.p50, 0.1);
        let mut h = [0u8; HEADER];
        encode_header(&mut h, 3, 2, 99, 12345);
        assert_eq!(decode_header(&h), Some((3, 2, 99, 12345)));
        assert_eq!(decode_header(&h[..10]), None);
    }
}
