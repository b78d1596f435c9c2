//! Running a workload: start, stream per-second windows, stop and drain.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::record::{Recorder, Window, now_ns};
use crate::spec::{Session, Spec};
use crate::stats::{Latency, QosReport};
use crate::worker::{self, Common, PubCfg, PubResult, SubCfg, SubResult};

/// A running workload. Dropping it stops every client task.
pub struct Workload {
    spec: Spec,
    rec: Arc<Recorder>,
    started: Instant,
    stop_pub: CancellationToken,
    give_up: CancellationToken,
    stop_sub: CancellationToken,
    pubs: Vec<JoinHandle<PubResult>>,
    subs: Vec<JoinHandle<SubResult>>,
    subscribed: usize,
    windows: Option<mpsc::UnboundedReceiver<Window>>,
    ticker: JoinHandle<()>,
}

/// The whole run once stopped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Unix time of second 0, in milliseconds.
    pub start_unix_ms: u64,
    /// Every second, with its losses filled in.
    pub windows: Vec<Window>,
    pub qos: [QosReport; 3],
    pub total: QosReport,
    /// From the start to the last receipt, seconds.
    pub window_s: f64,
    pub publisher_reconnects: u64,
    pub subscriber_reconnects: u64,
    /// Subscribers that subscribed before the publishers started.
    pub subscribed: usize,
    #[serde(skip)]
    pub latency_us: [Vec<u32>; 3],
    /// Per second: latency samples (µs) of the messages sent in it.
    #[serde(skip)]
    pub latency_by_send_second: Vec<Vec<u32>>,
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop_pub.cancel();
        self.give_up.cancel();
        self.stop_sub.cancel();
        self.ticker.abort();
    }
}

impl Workload {
    /// Connects the subscribers, waits up to `ready_within` for all of them
    /// to subscribe, then starts the publishers. Never fails on a broker that
    /// cannot be reached: `subscribed()` and the windows show it.
    pub async fn start(spec: Spec, ready_within: Duration) -> Result<Workload, String> {
        spec.validate()?;
        let rec = Arc::new(Recorder::new(now_ns()));
        let started = Instant::now();
        let common = |addr| Common {
            addr,
            version: spec.protocol.version(),
            persistent: spec.session == Session::Persistent,
            reconnect: spec.reconnect,
            rec: rec.clone(),
        };
        let stop_sub = CancellationToken::new();
        let ready = Arc::new(AtomicUsize::new(0));
        let probed: Vec<Arc<AtomicBool>> = (0..spec.subscriber_count()).map(|_| Arc::default()).collect();
        let mut subs = Vec::new();
        for (j, probed) in probed.iter().enumerate() {
            let addr = Spec::addr_of(&spec.subscribers, j).ok_or("subscriber without an address")?;
            subs.push(tokio::spawn(worker::subscriber(SubCfg {
                common: common(addr),
                id: format!("{}-sub-{j}", spec.id_prefix),
                filter: spec.filter_of(j),
                stop: stop_sub.clone(),
                ready: ready.clone(),
                probed: probed.clone(),
            })));
        }
        let deadline = Instant::now() + ready_within;
        while ready.load(Relaxed) < subs.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let subscribed = ready.load(Relaxed);
        // Publishers on another broker than their subscribers (a cluster)
        // start once a probe from each of their brokers reaches every
        // subscriber, that is once the subscriptions' routes have spread.
        let mut pub_addrs: Vec<_> = spec.publishers.iter().filter(|g| g.count > 0).map(|g| g.addr).collect();
        pub_addrs.sort();
        pub_addrs.dedup();
        let one_broker = spec.subscribers.iter().all(|g| g.count == 0 || pub_addrs == [g.addr]);
        if subscribed == subs.len() && !one_broker {
            let topics: Vec<String> = (0..spec.topic_count()).map(|t| spec.topic_of(t)).collect();
            for (k, &addr) in pub_addrs.iter().enumerate() {
                let id = format!("{}-probe-{k}", spec.id_prefix);
                let mut c = common(addr);
                c.persistent = false;
                if !worker::probe_routes(&c, &id, &topics, &probed, deadline).await {
                    stop_sub.cancel();
                    for s in subs {
                        let _ = s.await;
                    }
                    return Err(format!(
                        "the subscriptions did not reach the broker at {addr} within {ready_within:?}: \
                         a probe published there did not arrive at every subscriber"
                    ));
                }
            }
        }
        let stop_pub = CancellationToken::new();
        let give_up = CancellationToken::new();
        let mix = spec.qos_mix.as_array();
        let mut pubs = Vec::new();
        for i in 0..spec.publisher_count() {
            let addr = Spec::addr_of(&spec.publishers, i).ok_or("publisher without an address")?;
            pubs.push(tokio::spawn(worker::publisher(PubCfg {
                common: common(addr),
                id: format!("{}-pub-{i}", spec.id_prefix),
                index: i as u32,
                topic: spec.topic_of(i),
                rate: spec.rate,
                mix,
                payload: spec.payload,
                inflight: spec.inflight,
                fanout: spec.fanout_of(i),
                stop: stop_pub.clone(),
                give_up: give_up.clone(),
            })));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let ticker = tokio::spawn(tick(rec.clone(), tx));
        Ok(Workload {
            spec,
            rec,
            started,
            stop_pub,
            give_up,
            stop_sub,
            pubs,
            subs,
            subscribed,
            windows: Some(rx),
            ticker,
        })
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Subscribers subscribed when the publishers started.
    pub fn subscribed(&self) -> usize {
        self.subscribed
    }

    /// Unix time of second 0, in nanoseconds.
    pub fn start_unix_ns(&self) -> u64 {
        self.rec.start_ns
    }

    /// Seconds since start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Live windows, one per second as each second ends (`lost` is `None`:
    /// a loss is known only at the end). Once per workload.
    pub fn windows(&mut self) -> Option<mpsc::UnboundedReceiver<Window>> {
        self.windows.take()
    }

    /// Second `t` as it stands now.
    pub fn window(&self, t: u64) -> Window {
        self.rec.window(t, false)
    }

    /// Stops publishing, lets in-flight QoS 1/2 complete and the subscribers
    /// catch up for at most `drain`, then disconnects everything.
    pub async fn stop(mut self, drain: Duration) -> Summary {
        let give_up_at = Instant::now() + drain;
        self.stop_pub.cancel();
        let give_up = self.give_up.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(drain).await;
            give_up.cancel();
        });
        let mut pub_reconnects = 0;
        for p in std::mem::take(&mut self.pubs) {
            if let Ok(r) = p.await {
                pub_reconnects += r.reconnects;
            }
        }
        while self.rec.unique_received.load(Relaxed) < self.rec.expected_total() && Instant::now() < give_up_at {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        timer.abort();
        self.stop_sub.cancel();
        let mut sub_reconnects = 0;
        for s in std::mem::take(&mut self.subs) {
            if let Ok(r) = s.await {
                sub_reconnects += r.reconnects;
            }
        }
        self.ticker.abort();
        let windows: Vec<Window> = (0..self.rec.seconds()).map(|t| self.rec.window(t, true)).collect();
        let latency_us = self.rec.latency_samples();
        let last_rx = self.rec.last_rx_ns.load(Relaxed);
        let window_s = if last_rx > self.rec.start_ns {
            (last_rx - self.rec.start_ns) as f64 / 1e9
        } else {
            self.started.elapsed().as_secs_f64()
        };
        let mut qos: [QosReport; 3] = Default::default();
        for (q, r) in qos.iter_mut().enumerate() {
            for w in &windows {
                r.sent += w.sent[q];
                r.acked += w.acked[q];
                r.expected += w.expected[q];
                r.received += w.received[q];
                r.duplicated += w.duplicates[q];
                r.out_of_order += w.out_of_order[q];
                r.lost += w.lost.map_or(0, |l| l[q]);
            }
            r.throughput_msgs_per_s = r.received as f64 / window_s;
            r.latency_ms = Latency::of(&mut latency_us[q].clone());
        }
        let mut total = QosReport::default();
        for r in &qos {
            total.sent += r.sent;
            total.acked += r.acked;
            total.expected += r.expected;
            total.received += r.received;
            total.lost += r.lost;
            total.duplicated += r.duplicated;
            total.out_of_order += r.out_of_order;
            total.throughput_msgs_per_s += r.throughput_msgs_per_s;
        }
        total.latency_ms = Latency::of(&mut latency_us.iter().flatten().copied().collect::<Vec<_>>());
        Summary {
            start_unix_ms: self.rec.start_ns / 1_000_000,
            windows,
            qos,
            total,
            window_s,
            publisher_reconnects: pub_reconnects,
            subscriber_reconnects: sub_reconnects,
            subscribed: self.subscribed,
            latency_us,
            latency_by_send_second: self.rec.latency_by_send_second(),
        }
    }
}

/// Closes second t once it is over (plus a little, for receipts of its
/// last instant still being recorded) and sends its live window.
async fn tick(rec: Arc<Recorder>, tx: mpsc::UnboundedSender<Window>) {
    let start = rec.start_ns;
    let mut t = 0u64;
    loop {
        let due = start + (t + 1) * 1_000_000_000 + 50_000_000;
        let now = now_ns();
        if due > now {
            tokio::time::sleep(Duration::from_nanos(due - now)).await;
        }
        rec.close_second(t);
        // Nobody may be listening: the connection counts are kept anyway.
        let _ = tx.send(rec.window(t, false));
        t += 1;
    }
}
