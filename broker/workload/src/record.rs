//! Per-second bookkeeping shared by every publisher and subscriber task.
//!
//! Seconds are counted from the workload's start. A message is counted in
//! the second it was sent (sent, expected, and later lost) and in the second
//! it arrived (received, duplicates, latency), so a window can say both "what
//! arrived now" and, once the run is over, "what was sent now and never
//! arrived".

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::stats::{Latency, Receipt};

pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

#[derive(Default, Clone)]
struct Bucket {
    sent: [u64; 3],
    acked: [u64; 3],
    expected: [u64; 3],
    received: [u64; 3],
    duplicates: [u64; 3],
    out_of_order: [u64; 3],
    latency_us: [Vec<u32>; 3],
    /// Unique copies of the messages sent in this second that arrived.
    arrived_of_sent: [u64; 3],
    /// When (ns since start) the last of them arrived.
    last_arrival_of_sent: [u64; 3],
    /// Latency of the messages sent in this second (all QoS), microseconds.
    latency_of_sent_us: Vec<u32>,
    /// Connected clients and failed attempts when the second ended.
    connections: Option<(i64, i64, u64)>,
}

/// One second of the workload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Seconds since the workload started (this window covers [t, t+1)).
    pub t: u64,
    pub sent: [u64; 3],
    pub acked: [u64; 3],
    /// Copies the subscribers should get of what was sent in this second.
    pub expected: [u64; 3],
    /// Unique messages that arrived in this second (per subscriber).
    pub received: [u64; 3],
    pub duplicates: [u64; 3],
    pub out_of_order: [u64; 3],
    /// Of what was sent in this second, copies that never arrived. Known
    /// only when the workload has stopped; `None` in live windows.
    pub lost: Option<[u64; 3]>,
    /// When the last copy of a message sent in this second arrived, in
    /// seconds since start (`None` if nothing sent here arrived).
    pub last_arrival_of_sent: [Option<f64>; 3],
    /// End-to-end latency of what arrived in this second (all QoS); `None`
    /// when nothing arrived.
    pub latency_ms: Option<Latency>,
    pub publishers_connected: i64,
    pub subscribers_connected: i64,
    /// Failed connection attempts so far (cumulative).
    pub connect_failures: u64,
}

pub struct Recorder {
    pub start_ns: u64,
    buckets: Mutex<Vec<Bucket>>,
    pub publishers_connected: AtomicI64,
    pub subscribers_connected: AtomicI64,
    pub connect_failures: AtomicU64,
    pub unique_received: AtomicU64,
    /// Unix ns of the last receipt.
    pub last_rx_ns: AtomicU64,
}

impl Recorder {
    pub fn new(start_ns: u64) -> Recorder {
        Recorder {
            start_ns,
            buckets: Mutex::new(Vec::new()),
            publishers_connected: AtomicI64::new(0),
            subscribers_connected: AtomicI64::new(0),
            connect_failures: AtomicU64::new(0),
            unique_received: AtomicU64::new(0),
            last_rx_ns: AtomicU64::new(0),
        }
    }

    fn second(&self, ns: u64) -> usize {
        (ns.saturating_sub(self.start_ns) / 1_000_000_000) as usize
    }

    fn with(&self, sec: usize, f: impl FnOnce(&mut Bucket)) {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() <= sec {
            b.resize(sec + 1, Bucket::default());
        }
        f(&mut b[sec]);
    }

    pub fn sent(&self, q: usize, at_ns: u64, fanout: u64) {
        self.with(self.second(at_ns), |b| {
            b.sent[q] += 1;
            b.expected[q] += fanout;
        });
    }

    pub fn acked(&self, q: usize) {
        self.with(self.second(now_ns()), |b| b.acked[q] += 1);
    }

    pub fn received(&self, q: usize, sent_ns: u64, at_ns: u64, r: Receipt) {
        let lat_us = (at_ns.saturating_sub(sent_ns) / 1000).min(u64::from(u32::MAX)) as u32;
        let since_start = at_ns.saturating_sub(self.start_ns);
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (rx, tx) = (self.second(at_ns), self.second(sent_ns));
        if b.len() <= rx.max(tx) {
            b.resize(rx.max(tx) + 1, Bucket::default());
        }
        match r {
            Receipt::Duplicate => b[rx].duplicates[q] += 1,
            Receipt::Fresh { out_of_order } => {
                b[rx].received[q] += 1;
                b[rx].out_of_order[q] += u64::from(out_of_order);
                b[rx].latency_us[q].push(lat_us);
                b[tx].arrived_of_sent[q] += 1;
                b[tx].last_arrival_of_sent[q] = b[tx].last_arrival_of_sent[q].max(since_start);
                b[tx].latency_of_sent_us.push(lat_us);
                self.unique_received.fetch_add(1, Relaxed);
                self.last_rx_ns.fetch_max(at_ns, Relaxed);
            }
        }
    }

    /// Notes the connections as second `t` ends, for its window.
    pub fn close_second(&self, t: u64) {
        let c = (
            self.publishers_connected.load(Relaxed),
            self.subscribers_connected.load(Relaxed),
            self.connect_failures.load(Relaxed),
        );
        self.with(t as usize, |b| b.connections = Some(c));
    }

    /// Second `t` as it stands now; `finished` fills in the losses.
    pub fn window(&self, t: u64, finished: bool) -> Window {
        let b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let Some(x) = b.get(t as usize) else {
            drop(b);
            return Window { t, lost: finished.then_some([0; 3]), ..self.connection_snapshot() };
        };
        let mut all: Vec<u32> = x.latency_us.iter().flatten().copied().collect();
        let arrival = |q: usize| (x.arrived_of_sent[q] > 0).then(|| x.last_arrival_of_sent[q] as f64 / 1e9);
        let now = self.connection_snapshot();
        let (publishers_connected, subscribers_connected, connect_failures) =
            x.connections.unwrap_or((now.publishers_connected, now.subscribers_connected, now.connect_failures));
        Window {
            t,
            sent: x.sent,
            acked: x.acked,
            expected: x.expected,
            received: x.received,
            duplicates: x.duplicates,
            out_of_order: x.out_of_order,
            lost: finished.then(|| std::array::from_fn(|q| x.expected[q].saturating_sub(x.arrived_of_sent[q]))),
            last_arrival_of_sent: [arrival(0), arrival(1), arrival(2)],
            latency_ms: (!all.is_empty()).then(|| Latency::of(&mut all)),
            publishers_connected,
            subscribers_connected,
            connect_failures,
        }
    }

    fn connection_snapshot(&self) -> Window {
        Window {
            publishers_connected: self.publishers_connected.load(Relaxed),
            subscribers_connected: self.subscribers_connected.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            ..Window::default()
        }
    }

    pub fn seconds(&self) -> u64 {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len() as u64
    }

    /// Every latency sample per QoS, in microseconds.
    pub fn latency_samples(&self) -> [Vec<u32>; 3] {
        let b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        std::array::from_fn(|q| b.iter().flat_map(|x| x.latency_us[q].iter().copied()).collect())
    }

    /// Latency samples (µs) of the messages sent in each second.
    pub fn latency_by_send_second(&self) -> Vec<Vec<u32>> {
        let b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        b.iter().map(|x| x.latency_of_sent_us.clone()).collect()
    }

    /// Copies expected so far of everything sent.
    pub fn expected_total(&self) -> u64 {
        let b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        b.iter().map(|x| x.expected.iter().sum::<u64>()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_count_by_send_and_arrival_second() {
        let s = 1_000_000_000u64;
        let r = Recorder::new(10 * s);
        r.sent(1, 10 * s + 1, 2);
        r.sent(1, 10 * s + 2, 2);
        r.sent(0, 11 * s, 1);
        // Both copies of the first message arrive in second 1, one late.
        r.received(1, 10 * s + 1, 11 * s + 5, Receipt::Fresh { out_of_order: false });
        r.received(1, 10 * s + 1, 11 * s + 7, Receipt::Fresh { out_of_order: false });
        r.received(1, 10 * s + 1, 11 * s + 9, Receipt::Duplicate);
        let w0 = r.window(0, true);
        assert_eq!((w0.sent[1], w0.expected[1], w0.received[1]), (2, 4, 0));
        assert_eq!(w0.lost, Some([0, 2, 0]));
        assert!(w0.latency_ms.is_none());
        assert!((w0.last_arrival_of_sent[1].unwrap() - 1.0).abs() < 1e-6);
        let w1 = r.window(1, false);
        assert_eq!((w1.received[1], w1.duplicates[1], w1.sent[0]), (2, 1, 1));
        assert_eq!(w1.lost, None);
        assert!(w1.latency_ms.unwrap().p99 >= 1000.0);
        assert_eq!(r.window(5, true).lost, Some([0; 3]));
        // A window keeps the connections of its own second.
        r.publishers_connected.store(2, Relaxed);
        r.close_second(1);
        r.publishers_connected.store(0, Relaxed);
        assert_eq!((r.window(1, true).publishers_connected, r.window(2, true).publishers_connected), (2, 0));
    }
}
