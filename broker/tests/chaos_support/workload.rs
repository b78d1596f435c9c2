//! A steady MQTT workload for the chaos tests: one publisher numbering its
//! messages at a fixed rate, subscribers recording when each number arrived.
//! "Acknowledged" means the broker took the message over: PUBACK for QoS 1,
//! PUBREC for QoS 2. Lost = acknowledged but never received.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker::client::{Client, connect_packet, publish};
use broker::codec::{Ack, Packet, PropertyValues, QoS, Version};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::common::{connect, subscribe};

/// Unacknowledged messages beyond which the publisher waits.
const INFLIGHT: usize = 1000;

#[derive(Default)]
struct PubLog {
    sent_at: Vec<Instant>,
    acked_at: Vec<Option<Instant>>,
}

#[derive(Default)]
struct SubLog {
    got_at: HashMap<u32, Instant>,
    duplicates: u32,
    probes: u32,
    reconnects: u32,
}

/// A subscriber: where it connects, and whether its session is persistent
/// (it then reconnects when its node goes away, and resumes the session).
#[derive(Clone, Copy)]
pub struct Sub {
    pub addr: SocketAddr,
    pub persistent: bool,
}

pub struct Workload {
    stop_pub: CancellationToken,
    stop_subs: CancellationToken,
    publisher: JoinHandle<()>,
    subs: Vec<JoinHandle<()>>,
    pub_log: Arc<Mutex<PubLog>>,
    sub_logs: Vec<Arc<Mutex<SubLog>>>,
}

pub struct SubReport {
    pub received: usize,
    pub reconnects: u32,
    pub lost: usize,
    pub duplicates: u32,
    got_at: HashMap<u32, Instant>,
}

pub struct Report {
    pub sent: usize,
    pub acked: usize,
    pub subscribers: Vec<SubReport>,
    sent_at: Vec<Instant>,
    acked_at: Vec<Option<Instant>>,
}

impl Workload {
    /// Subscribers on `subs` take `TOPIC/#` at `qos`; once a probe from
    /// `publisher_at` reaches all of them (routes have spread), a publisher
    /// there sends `rate` messages a second on `TOPIC/data`.
    pub async fn start(publisher_at: SocketAddr, subs: &[Sub], topic: &str, qos: QoS, rate: f64) -> Workload {
        let stop_subs = CancellationToken::new();
        let mut sub_logs = Vec::new();
        let mut tasks = Vec::new();
        for (i, &sub) in subs.iter().enumerate() {
            let id = format!("chaos-sub-{i}");
            let mut c = if sub.persistent {
                session(sub.addr, &id).await.unwrap_or_else(|e| panic!("connecting {id}: {e}"))
            } else {
                connect(sub.addr, Version::V5, &id, true).await
            };
            subscribe(&mut c, &format!("{topic}/#"), qos).await;
            let log = Arc::new(Mutex::new(SubLog::default()));
            sub_logs.push(log.clone());
            let s = Receiver { sub, id, data: format!("{topic}/data"), log, stop: stop_subs.clone() };
            tasks.push(tokio::spawn(s.run(c)));
        }
        let mut p = connect(publisher_at, Version::V5, "chaos-pub", true).await;
        let t0 = Instant::now();
        while sub_logs.iter().any(|l| l.lock().expect("log").probes == 0) {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "routes from {publisher_at} did not reach every subscriber"
            );
            p.send(&publish(&format!("{topic}/probe"), QoS::AtMostOnce, 0, &b"probe"[..])).await.expect("probe");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let stop_pub = CancellationToken::new();
        let pub_log = Arc::new(Mutex::new(PubLog::default()));
        let publisher = tokio::spawn(send(p, format!("{topic}/data"), qos, rate, pub_log.clone(), stop_pub.clone()));
        Workload { stop_pub, stop_subs, publisher, subs: tasks, pub_log, sub_logs }
    }

    /// Stops publishing, waits up to `wait` for every acknowledged message to
    /// reach every subscriber, and reports.
    pub async fn finish(&mut self, wait: Duration) -> Report {
        self.stop_pub.cancel();
        (&mut self.publisher).await.expect("publisher task");
        let (sent_at, acked_at) = {
            let l = self.pub_log.lock().expect("log");
            (l.sent_at.clone(), l.acked_at.clone())
        };
        let acked: Vec<u32> = (0..acked_at.len() as u32).filter(|&i| acked_at[i as usize].is_some()).collect();
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline
            && self.sub_logs.iter().any(|l| {
                let l = l.lock().expect("log");
                acked.iter().any(|i| !l.got_at.contains_key(i))
            })
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.stop_subs.cancel();
        for t in self.subs.drain(..) {
            t.await.expect("subscriber task");
        }
        let subscribers = self
            .sub_logs
            .iter()
            .map(|l| {
                let l = l.lock().expect("log");
                SubReport {
                    received: l.got_at.len(),
                    reconnects: l.reconnects,
                    lost: acked.iter().filter(|i| !l.got_at.contains_key(i)).count(),
                    duplicates: l.duplicates,
                    got_at: l.got_at.clone(),
                }
            })
            .collect();
        Report { sent: sent_at.len(), acked: acked.len(), subscribers, sent_at, acked_at }
    }
}

impl Report {
    /// Messages sent between `from` and `to`.
    pub fn sent_during(&self, from: Instant, to: Instant) -> usize {
        self.sent_at.iter().filter(|&&t| t >= from && t < to).count()
    }

    /// How long after `from` subscriber `sub` had every message acknowledged
    /// before `acked_before` (zero if it had them all by `from`).
    pub fn full_delivery(&self, sub: usize, acked_before: Instant, from: Instant) -> Duration {
        let got = &self.subscribers[sub].got_at;
        (0..self.acked_at.len())
            .filter(|&i| self.acked_at[i].is_some_and(|t| t < acked_before))
            .filter_map(|i| got.get(&(i as u32)))
            .map(|&t| t.saturating_duration_since(from))
            .max()
            .unwrap_or_default()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sent {}, acknowledged {}", self.sent, self.acked)?;
        for (i, s) in self.subscribers.iter().enumerate() {
            write!(
                f,
                "; subscriber {i}: received {}, lost {}, duplicates {}, reconnects {}",
                s.received, s.lost, s.duplicates, s.reconnects
            )?;
        }
        Ok(())
    }
}

async fn send(mut c: Client, topic: String, qos: QoS, rate: f64, log: Arc<Mutex<PubLog>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inflight: HashMap<u16, u32> = HashMap::new();
    let mut next_pid: u16 = 0;
    let mut stopping_since: Option<Instant> = None;
    loop {
        if stopping_since.is_none() && stop.is_cancelled() {
            stopping_since = Some(Instant::now());
        }
        if let Some(t) = stopping_since
            && (inflight.is_empty() || t.elapsed() > Duration::from_secs(20))
        {
            return;
        }
        tokio::select! {
            _ = tick.tick(), if stopping_since.is_none() && inflight.len() < INFLIGHT => {
                let seq = {
                    let mut l = log.lock().expect("log");
                    l.sent_at.push(Instant::now());
                    l.acked_at.push(None);
                    l.sent_at.len() as u32 - 1
                };
                loop {
                    next_pid = next_pid.wrapping_add(1).max(1);
                    if !inflight.contains_key(&next_pid) { break; }
                }
                inflight.insert(next_pid, seq);
                let mut payload = seq.to_be_bytes().to_vec();
                payload.resize(64, 0);
                c.send(&publish(&topic, qos, next_pid, payload)).await.expect("publisher lost its connection");
            }
            p = c.rd.recv() => match p.expect("publisher lost its connection") {
                Packet::PubAck(a) if a.code < 0x80 => {
                    if let Some(seq) = inflight.remove(&a.pid) {
                        log.lock().expect("log").acked_at[seq as usize] = Some(Instant::now());
                    }
                }
                Packet::PubRec(a) if a.code < 0x80 => {
                    if let Some(&seq) = inflight.get(&a.pid) {
                        log.lock().expect("log").acked_at[seq as usize] = Some(Instant::now());
                    }
                    c.send(&Packet::PubRel(Ack::new(a.pid, 0))).await.expect("publisher lost its connection");
                }
                Packet::PubComp(a) => { inflight.remove(&a.pid); }
                Packet::PubAck(a) | Packet::PubRec(a) => { inflight.remove(&a.pid); eprintln!("broker refused message: {a:?}"); }
                _ => {}
            },
            _ = stop.cancelled(), if stopping_since.is_none() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)), if stopping_since.is_some() => {}
        }
    }
}

/// Connects `id` with a persistent session (clean start off, an hour's
/// session expiry); whether the broker still had the session is in the log.
async fn session(addr: SocketAddr, id: &str) -> Result<Client, String> {
    let mut c = connect_packet(Version::V5, id, false, 30);
    c.props = PropertyValues { session_expiry: Some(3600), ..Default::default() }.into();
    let (cl, ack) = Client::connect(addr, c).await.map_err(|e| e.to_string())?;
    if ack.code != 0 {
        return Err(format!("CONNACK reason {:#x}", ack.code));
    }
    Ok(cl)
}

struct Receiver {
    sub: Sub,
    id: String,
    data: String,
    log: Arc<Mutex<SubLog>>,
    stop: CancellationToken,
}

impl Receiver {
    async fn run(self, mut c: Client) {
        loop {
            match self.receive(&mut c).await {
                Ok(()) => return,
                Err(e) if self.sub.persistent => {
                    eprintln!("{}: connection lost ({e}); reconnecting", self.id);
                    c = self.reconnect().await;
                }
                Err(e) => panic!("{}: connection lost: {e}", self.id),
            }
        }
    }

    async fn reconnect(&self) -> Client {
        let t0 = Instant::now();
        loop {
            match session(self.sub.addr, &self.id).await {
                Ok(c) => {
                    self.log.lock().expect("log").reconnects += 1;
                    eprintln!("{}: reconnected after {:.1}s", self.id, t0.elapsed().as_secs_f64());
                    return c;
                }
                Err(_) if t0.elapsed() < Duration::from_secs(60) => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("{}: could not reconnect to {} within 60 s: {e}", self.id, self.sub.addr),
            }
        }
    }

    /// Receives until stopped (Ok) or the connection fails (Err).
    async fn receive(&self, c: &mut Client) -> Result<(), String> {
        loop {
            let p = tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                p = c.rd.recv() => p.map_err(|e| e.to_string())?,
            };
            match p {
                Packet::Publish(m) => {
                    let ack = match m.qos {
                        QoS::AtMostOnce => None,
                        QoS::AtLeastOnce => Some(Packet::PubAck(Ack::new(m.pid, 0))),
                        QoS::ExactlyOnce => Some(Packet::PubRec(Ack::new(m.pid, 0))),
                    };
                    if let Some(a) = ack {
                        c.send(&a).await.map_err(|e| e.to_string())?;
                    }
                    let mut l = self.log.lock().expect("log");
                    if m.topic != self.data {
                        l.probes += 1;
                    } else if m.payload.len() >= 4 {
                        let seq = u32::from_be_bytes(m.payload[..4].try_into().expect("4 bytes"));
                        match l.got_at.entry(seq) {
                            std::collections::hash_map::Entry::Occupied(_) => l.duplicates += 1,
                            std::collections::hash_map::Entry::Vacant(v) => {
                                v.insert(Instant::now());
                            }
                        }
                    }
                }
                Packet::PubRel(a) => c.send(&Packet::PubComp(Ack::new(a.pid, 0))).await.map_err(|e| e.to_string())?,
                _ => {}
            }
        }
    }
}
