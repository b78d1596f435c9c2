//! The writer half of a connection: encodes outbound work, batching whatever
//! is queued into one write, and assigns outgoing topic aliases.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::codec::{self, Disconnect, Packet, Properties, Version, encode_publish_parts};
use crate::message::{Delivery, Outbound, unix_now};
use crate::metrics::Metrics;

pub struct Writer {
    pub wr: OwnedWriteHalf,
    pub rx: mpsc::UnboundedReceiver<Outbound>,
    pub version: Version,
    /// The client's topic alias maximum (broker → client direction).
    pub alias_max: u16,
    pub metrics: Arc<Metrics>,
    pub qos0_pending: Arc<AtomicUsize>,
    pub inflight_in: Arc<AtomicUsize>,
    /// Cancelled when either half is done.
    pub local: CancellationToken,
    /// The reason code of a `Close` the writer sent.
    pub close_code: Arc<AtomicU8>,
}

const BATCH: usize = 64 * 1024;

fn saturating_dec(a: &AtomicUsize) {
    let _ = a.fetch_update(Relaxed, Relaxed, |v| v.checked_sub(1));
}

impl Writer {
    /// Encodes one item; returns true when the connection must close after
    /// this batch.
    fn put(&mut self, out: &mut BytesMut, item: Outbound, aliases: &mut HashMap<String, u16>) -> bool {
        match item {
            Outbound::Packet(p) => {
                if matches!(*p, Packet::PubAck(_) | Packet::PubComp(_)) {
                    saturating_dec(&self.inflight_in);
                }
                codec::encode(&p, self.version, out);
                false
            }
            Outbound::Deliver(d) => {
                self.deliver(out, d, aliases);
                false
            }
            Outbound::Close(code) => {
                self.close_code.store(code, Relaxed);
                if self.version == Version::V5 {
                    codec::encode(
                        &Packet::Disconnect(Disconnect { code, props: Properties::default() }),
                        self.version,
                        out,
                    );
                }
                true
            }
        }
    }

    fn deliver(&mut self, out: &mut BytesMut, d: Delivery, aliases: &mut HashMap<String, u16>) {
        let q = d.qos as usize;
        if q == 0 {
            saturating_dec(&self.qos0_pending);
        }
        let m = &d.msg;
        let v5 = self.version == Version::V5;
        let mut topic: &str = &m.topic;
        let needs_props = v5 && (!d.sub_ids.is_empty() || m.expires_at.is_some() || self.alias_max > 0);
        if needs_props {
            let mut props = m.props.clone();
            props.subscription_ids = d.sub_ids;
            props.message_expiry = m.remaining(unix_now());
            if self.alias_max > 0 {
                if let Some(a) = aliases.get(topic) {
                    props.topic_alias = Some(*a);
                    topic = "";
                } else if aliases.len() < usize::from(self.alias_max) {
                    let a = aliases.len() as u16 + 1;
                    aliases.insert(m.topic.clone(), a);
                    props.topic_alias = Some(a);
                }
            }
            encode_publish_parts(out, self.version, d.dup, d.qos, d.retain, topic, d.pid, &props, &m.payload);
        } else {
            encode_publish_parts(out, self.version, d.dup, d.qos, d.retain, topic, d.pid, &m.props, &m.payload);
        }
        self.metrics.sent[q].fetch_add(1, Relaxed);
        if !d.dup {
            self.metrics.observe_latency(m.received_at.elapsed());
        }
    }
}

pub async fn run(mut w: Writer) {
    let mut out = BytesMut::with_capacity(BATCH);
    let mut aliases = HashMap::new();
    let local = w.local.clone();
    // One cancellation waiter for the connection, not one per batch.
    let cancelled = local.cancelled();
    tokio::pin!(cancelled);
    'outer: loop {
        let first = tokio::select! {
            m = w.rx.recv() => m,
            () = &mut cancelled => None,
        };
        let Some(first) = first else { break };
        if first.is_ack() && w.rx.is_empty() {
            // The router hands out a publish's deliveries and then its ack; the
            // scheduler runs the task woken last first, so without this the
            // publisher's PUBACK would be written before every subscriber's
            // PUBLISH. Yielding once lets the deliveries go out first, the
            // order mosquitto writes them in; the ack follows once the tasks
            // already woken have run and the runtime has polled the sockets.
            tokio::task::yield_now().await;
        }
        out.clear();
        let mut closing = w.put(&mut out, first, &mut aliases);
        while !closing && out.len() < BATCH {
            match w.rx.try_recv() {
                Ok(item) => closing = w.put(&mut out, item, &mut aliases),
                Err(_) => break,
            }
        }
        let write = w.wr.write_all(&out);
        tokio::select! {
            r = write => if r.is_err() { break 'outer },
            () = &mut cancelled => break 'outer,
        }
        if closing {
            let _ = w.wr.shutdown().await;
            break;
        }
    }
    local.cancel();
}
