//! The router: single owner of sessions, subscriptions and retained messages.
//!
//! Connection tasks send it `ToRouter` messages over one bounded channel
//! (backpressure on publishers); it answers through each connection's outbox,
//! which writes to the socket without waiting or queues behind a backlog
//! bounded in practice by the inflight window and the QoS 0 pending limit.
//! What one batch of its inbox sends to a connection goes out in one write
//! after the batch (`outbox::corked`); a batch is what the inbox holds once
//! the connections that were ready with the first message have read. It
//! never awaits anything but its inbox.

mod handlers;
pub mod session;
pub mod subs;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::codec::{ConnAck, Connect, Publish, Subscribe, Unsubscribe};
use crate::config::Config;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::store::{Loaded, StoreHandle};
pub use session::ConnHandle;
use session::Session;
use subs::SubTable;

/// Messages from connections. Every one names the connection, so requests
/// from a connection that has been taken over are ignored. A cluster layer
/// would add variants for publishes and routes from other nodes.
pub enum ToRouter {
    Connect {
        conn: ConnHandle,
        connect: Box<Connect>,
        connack: ConnAck,
        reply: oneshot::Sender<()>,
    },
    Publish {
        conn: u64,
        client: Arc<str>,
        publish: Publish,
    },
    PubAck {
        conn: u64,
        client: Arc<str>,
        pid: u16,
    },
    PubRec {
        conn: u64,
        client: Arc<str>,
        pid: u16,
        code: u8,
    },
    PubRel {
        conn: u64,
        client: Arc<str>,
        pid: u16,
    },
    PubComp {
        conn: u64,
        client: Arc<str>,
        pid: u16,
    },
    Subscribe {
        conn: u64,
        client: Arc<str>,
        sub: Subscribe,
    },
    Unsubscribe {
        conn: u64,
        client: Arc<str>,
        unsub: Unsubscribe,
    },
    /// The connection ended. `publish_will` is false after a normal
    /// DISCONNECT; `session_expiry` is the v5 DISCONNECT's new interval.
    Disconnected {
        conn: u64,
        client: Arc<str>,
        publish_will: bool,
        session_expiry: Option<u32>,
    },
}

/// Most inbox messages handled in one batch (one write per connection).
const BATCH: usize = 256;

pub struct Router {
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    store: Option<StoreHandle>,
    sessions: HashMap<Arc<str>, Session>,
    subs: SubTable,
    retained: HashMap<String, Arc<Message>>,
    /// Wills waiting for their delay: (due, client, connection that left it).
    pending_wills: Vec<(Instant, Arc<str>, crate::codec::Will)>,
    started: Instant,
    last_sys: Instant,
}

impl Router {
    pub fn new(cfg: Arc<Config>, metrics: Arc<Metrics>, store: Option<StoreHandle>, loaded: Loaded) -> Router {
        let mut r = Router {
            cfg,
            metrics,
            store,
            sessions: HashMap::new(),
            subs: SubTable::default(),
            retained: HashMap::new(),
            pending_wills: Vec::new(),
            started: Instant::now(),
            last_sys: Instant::now(),
        };
        for m in loaded.retained {
            r.retained.insert(m.topic.clone(), Arc::new(m));
        }
        for (client, ls) in loaded.sessions {
            let Some(meta) = ls.meta else { continue };
            let id: Arc<str> = Arc::from(client);
            let s = Session::restore(id.clone(), meta, ls.entries, ls.incoming_qos2);
            for (filter, sub) in &s.subs {
                let (share, f) = split_share(filter);
                r.subs.insert(&id, share, f, *sub);
            }
            r.sessions.insert(id, s);
        }
        r.update_gauges();
        r
    }

    /// Runs until `shutdown` fires or every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<ToRouter>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut buf, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    // Connections made readable by the same wake-up as this
                    // message are queued on this thread behind the router:
                    // let them read first, so that a burst (ten publishers on
                    // one timer tick) goes out in one write per connection,
                    // not one per message, and a subscriber wakes once for it.
                    behind_queued_tasks().await;
                    while buf.len() < BATCH
                        && let Ok(m) = rx.try_recv()
                    {
                        buf.push(m);
                    }
                    crate::conn::outbox::corked(|| {
                        for m in buf.drain(..) {
                            self.handle(m);
                        }
                    });
                }
                _ = tick.tick() => crate::conn::outbox::corked(|| self.on_tick()),
                _ = shutdown.cancelled() => break,
            }
        }
        for s in self.sessions.values() {
            if let Some(c) = &s.conn {
                let _ = c.tx.send(crate::message::Outbound::Close(crate::codec::reason::SERVER_SHUTTING_DOWN));
            }
        }
    }

    fn handle(&mut self, m: ToRouter) {
        match m {
            ToRouter::Connect { conn, connect, connack, reply } => {
                self.on_connect(conn, *connect, connack);
                let _ = reply.send(());
            }
            ToRouter::Publish { conn, client, publish } => self.on_publish(conn, &client, publish),
            ToRouter::PubAck { conn, client, pid } => {
                self.on_complete(conn, &client, pid, crate::codec::QoS::AtLeastOnce)
            }
            ToRouter::PubComp { conn, client, pid } => {
                self.on_complete(conn, &client, pid, crate::codec::QoS::ExactlyOnce)
            }
            ToRouter::PubRec { conn, client, pid, code } => self.on_pubrec(conn, &client, pid, code),
            ToRouter::PubRel { conn, client, pid } => self.on_pubrel(conn, &client, pid),
            ToRouter::Subscribe { conn, client, sub } => self.on_subscribe(conn, &client, sub),
            ToRouter::Unsubscribe { conn, client, unsub } => self.on_unsubscribe(conn, &client, unsub),
            ToRouter::Disconnected { conn, client, publish_will, session_expiry } => {
                self.on_disconnected(conn, &client, publish_will, session_expiry)
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        // Expired sessions.
        let expired: Vec<Arc<str>> = self
            .sessions
            .values()
            .filter(|s| {
                s.conn.is_none()
                    && s.expiry != u32::MAX
                    && s.disconnected_at.is_some_and(|t| now >= t + Duration::from_secs(u64::from(s.expiry)))
            })
            .map(|s| s.id.clone())
            .collect();
        for id in expired {
            self.end_session(&id);
        }
        // Delayed wills.
        let due: Vec<_> = {
            let (due, keep) = std::mem::take(&mut self.pending_wills).into_iter().partition(|(t, _, _)| *t <= now);
            self.pending_wills = keep;
            due
        };
        for (_, client, will) in due {
            self.publish_will(&client, will);
        }
        let unix = crate::message::unix_now();
        self.retained.retain(|_, m| !m.expired(unix));
        self.update_gauges();
        if self.cfg.sys_interval_secs > 0 && now >= self.last_sys + Duration::from_secs(self.cfg.sys_interval_secs) {
            self.last_sys = now;
            self.publish_sys();
        }
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.sessions.store(self.sessions.len() as u64, Relaxed);
        m.subscriptions.store(self.subs.len() as u64, Relaxed);
        m.retained.store(self.retained.len() as u64, Relaxed);
        m.inflight.store(self.sessions.values().map(|s| s.inflight_len() as u64).sum(), Relaxed);
        m.queued.store(self.sessions.values().map(|s| s.queued_len() as u64).sum(), Relaxed);
    }
}

/// Returns after the tasks already queued on this worker thread have run.
/// A task that wakes itself while being polled goes to the back of tokio's
/// run queue (a wake by another task on the thread, as the first publish's
/// send, puts it first); `tokio::task::yield_now` would instead wait for the
/// I/O driver's next poll, one more `epoll_wait` per batch. With nothing
/// queued it returns at once.
async fn behind_queued_tasks() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

/// `$share/g/f` → (Some(g), f); anything else → (None, filter).
pub fn split_share(filter: &str) -> (Option<&str>, &str) {
    match crate::topic::parse_shared(filter) {
        Some(Ok((g, f))) => (Some(g), f),
        _ => (None, filter),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    /// A task queued on the worker before the router yields runs before the
    /// router goes on: what lets a burst's readers read first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn behind_queued_tasks_lets_queued_tasks_run_first() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let o = order.clone();
        tokio::spawn(async move {
            let o2 = o.clone();
            let queued = tokio::spawn(async move { o2.lock().unwrap().push("queued") });
            super::behind_queued_tasks().await;
            o.lock().unwrap().push("router");
            queued.await.unwrap();
        })
        .await
        .unwrap();
        assert_eq!(*order.lock().unwrap(), ["queued", "router"]);
    }
}
