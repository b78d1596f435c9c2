//! The router: single owner of sessions, subscriptions and retained messages.
//!
//! Connection tasks send it `ToRouter` messages through one inbox bounded at
//! `inbox::CAPACITY` messages (backpressure on publishers, `crate::inbox`); it
//! answers through each connection's outbox, which writes to the socket
//! without waiting or queues behind a backlog bounded in practice by the
//! inflight window and the QoS 0 pending limit.
//! What one batch of its inbox sends to a connection goes out in one write
//! after the batch (`outbox::corked`). While bursts write to one connection
//! more than once (`Bursts`), a batch is what the inbox holds once the
//! connections that were ready with the first message have read; otherwise
//! it is what the inbox holds when the router runs, and the publishers' acks
//! wait for the end of the burst (`release_behind_queued_tasks`). It awaits
//! nothing but its inbox and, while gathering, the readers queued behind it.

mod handlers;
mod remote;
mod retained;
pub mod session;
pub mod subs;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::inbox;
pub use crate::inbox::{ConnHandle, ToRouter};
use crate::message::Message;
use crate::metrics::Metrics;
use crate::store::{Loaded, StoreHandle};
use foldhash::{HashMap, HashMapExt};
use session::Session;
use subs::SubTable;

/// How often the router looks at expiries, wills, gauges and `$SYS`.
const TICK: Duration = Duration::from_millis(250);

/// Most inbox messages handled in one batch (one write per connection).
const BATCH: usize = 256;

/// What `route` gives one subscriber or node: QoS, retain as published,
/// subscription ids, and for a node the shared groups it was chosen for.
type Target = (crate::codec::QoS, bool, Vec<u32>, Vec<(String, String)>);

pub struct Router {
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    store: Option<StoreHandle>,
    sessions: HashMap<Arc<str>, Session>,
    subs: SubTable,
    retained: HashMap<String, Arc<Message>>,
    /// Stamp of the last write of each retained topic, cleared ones too
    /// (`retained.rs`).
    retained_stamps: HashMap<String, crate::message::Stamp>,
    /// Highest retained stamp (milliseconds) made or seen.
    hlc: u64,
    /// Wills waiting for their delay: (due, client, connection that left it).
    pending_wills: Vec<(Instant, Arc<str>, crate::codec::Will)>,
    started: Instant,
    last_sys: Instant,
    bursts: Bursts,
    /// `route`'s sessions to deliver to, empty between publishes.
    targets: HashMap<Arc<str>, Target>,
    /// The cluster, when this node is part of one: told about local routes,
    /// given the publishes for remote ones. Never awaited.
    cluster: Option<crate::cluster::Outlet>,
    /// Routes held for each peer, by its key in `subs`
    /// (`cluster::REMOTE_PREFIX` + name), so a full resync can replace them.
    remote: HashMap<Arc<str>, foldhash::HashSet<(String, String)>>,
}

impl Router {
    pub fn new(
        cfg: Arc<Config>,
        metrics: Arc<Metrics>,
        store: Option<StoreHandle>,
        loaded: Loaded,
        cluster: Option<crate::cluster::Outlet>,
    ) -> Router {
        let mut r = Router {
            cfg,
            metrics,
            store,
            sessions: HashMap::new(),
            subs: SubTable::default(),
            retained: HashMap::new(),
            retained_stamps: HashMap::new(),
            hlc: 0,
            pending_wills: Vec::new(),
            started: Instant::now(),
            last_sys: Instant::now(),
            bursts: Bursts::default(),
            targets: HashMap::new(),
            cluster,
            remote: HashMap::new(),
        };
        r.restore_retained(loaded.retained);
        for (client, ls) in loaded.sessions {
            let Some(meta) = ls.meta else { continue };
            let id: Arc<str> = Arc::from(client);
            let s = Session::restore(id.clone(), meta, ls.entries, ls.incoming_qos2);
            for (filter, sub) in &s.subs {
                let (share, f) = split_share(filter);
                r.subs.insert(&id, share, f, *sub);
                r.route_event(filter, sub, true);
            }
            r.sessions.insert(id, s);
        }
        r.update_gauges();
        r
    }

    /// Runs until the inbox says stop (the ticker holds a sender, so the
    /// inbox does not close before). `tx` is the inbox's own sender, for the
    /// ticks: they come as messages, so that
    /// the loop awaits nothing but the inbox (an `Interval` polled beside it
    /// after every batch cost about 600 instructions per QoS 1 message).
    pub async fn run(mut self, mut rx: inbox::Receiver, tx: inbox::Sender) {
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                tx.push(ToRouter::Tick);
            }
        });
        let mut buf = Vec::with_capacity(BATCH);
        let held = Arc::new(crate::outbox::Held::default());
        let releaser = tokio::spawn(release_behind_queued_tasks(held.clone()));
        let mut stop = false;
        while !stop {
            if rx.recv_many(&mut buf, BATCH).await == 0 {
                break;
            }
            // Connections made readable by the same wake-up as this
            // message are queued on this thread behind the router:
            // when bursts write to one connection more than once (ten
            // publishers on one timer tick, one subscriber), let them
            // read first, so that the burst goes out in one write per
            // connection and a subscriber wakes once for it.
            // Otherwise route at once, and hold only the acks.
            let gather = self.bursts.gather();
            if gather {
                behind_queued_tasks().await;
                while buf.len() < BATCH
                    && let Some(m) = rx.try_recv()
                {
                    buf.push(m);
                }
            }
            let mut publishes = false;
            let batch = || {
                for m in buf.drain(..) {
                    let Some(m) = m else {
                        stop = true;
                        break;
                    };
                    publishes |= matches!(m, ToRouter::Publish { .. });
                    self.handle(m);
                }
            };
            if gather {
                crate::outbox::corked(batch);
            } else {
                crate::outbox::corked_holding_acks(&held, batch);
            }
            if publishes {
                self.bursts.after_batch(crate::outbox::repeated());
            }
        }
        releaser.abort();
        ticker.abort();
        held.release();
        for s in self.sessions.values() {
            if let Some(c) = &s.conn {
                let _ = c.tx.send(crate::message::Outbound::Close(crate::codec::reason::SERVER_SHUTTING_DOWN));
            }
        }
    }

    fn handle(&mut self, m: ToRouter) {
        match m {
            ToRouter::Connect { conn, req, reply } => {
                let crate::inbox::ConnectReq { connect, connack, moved } = *req;
                self.on_connect(conn, connect, connack, moved);
                let _ = reply.send(());
            }
            ToRouter::Publish { conn, client, publish } => self.on_publish(conn, &client, *publish),
            ToRouter::PubAck { conn, client, pid } => {
                self.on_complete(conn, &client, pid, crate::codec::QoS::AtLeastOnce)
            }
            ToRouter::PubComp { conn, client, pid } => {
                self.on_complete(conn, &client, pid, crate::codec::QoS::ExactlyOnce)
            }
            ToRouter::PubRec { conn, client, pid, code } => self.on_pubrec(conn, &client, pid, code),
            ToRouter::PubRel { conn, client, pid } => self.on_pubrel(conn, &client, pid),
            ToRouter::Subscribe { conn, client, sub } => self.on_subscribe(conn, &client, *sub),
            ToRouter::Unsubscribe { conn, client, unsub } => self.on_unsubscribe(conn, &client, *unsub),
            ToRouter::RemoteRoutes(r) => self.on_remote_routes(*r),
            ToRouter::Forwarded(f) => self.on_forwarded(*f),
            ToRouter::Reassign(r) => self.on_reassign(*r),
            ToRouter::RetainedSync(entries) => self.on_retained_sync(*entries),
            ToRouter::TakeOver { client, clean_start, reply } => {
                let _ = reply.send(self.on_take_over(&client, clean_start));
            }
            ToRouter::Tick => self.on_tick(),
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
        let remote: usize = self.remote.values().map(|r| r.len()).sum();
        m.subscriptions.store(self.subs.len().saturating_sub(remote) as u64, Relaxed);
        m.retained.store(self.retained.len() as u64, Relaxed);
        m.inflight.store(self.sessions.values().map(|s| s.inflight_len() as u64).sum(), Relaxed);
        m.queued.store(self.sessions.values().map(|s| s.queued_len() as u64).sum(), Relaxed);
    }
}

/// Weight of one batch in `Bursts::score` (1/32: the score is a moving
/// average over about the last 32 batches that carried a publish).
const SCORE_SHIFT: u32 = 5;
/// Full score: every recent batch repeated a connection.
const SCORE_ONE: u32 = 1 << 16;
/// The router gathers while more than this share of recent batches repeated
/// a connection (3/10).
const GATHER_ABOVE: u32 = SCORE_ONE * 3 / 10;

/// Whether the router waits for the rest of a burst before routing it. It
/// pays where one burst writes to a connection several times (fan-in: the
/// subscriber gets one write and one wake-up instead of ten) and costs where
/// every connection gets one packet per burst (10->10: the first deliveries
/// would wait for the other reads). Decided by the share of recent batches
/// carrying a publish that wrote a connection already written in the same
/// wake-up (`outbox::repeated`): at 500 msg/s per publisher, 10->1 fan-in
/// repeated in 61-84% of such batches, 10->10 and 1->10 fan-out in 0.3-12%.
/// A single repeat must not decide: the rule before this one gathered for the
/// next 64 batches after any repeat, which kept QoS 0 10->10 gathering in 93%
/// of its batches.
#[derive(Debug)]
struct Bursts {
    /// Moving average of repeated batches, `SCORE_ONE` = all of them.
    score: u32,
}

impl Default for Bursts {
    fn default() -> Self {
        // Start as if half the batches repeated: gathering, until the
        // traffic shows otherwise (about 16 batches for 10->10).
        Bursts { score: SCORE_ONE / 2 }
    }
}

impl Bursts {
    /// Counts a batch that carried a publish.
    fn after_batch(&mut self, repeated: bool) {
        self.score -= self.score >> SCORE_SHIFT;
        if repeated {
            self.score += SCORE_ONE >> SCORE_SHIFT;
        }
    }

    fn gather(&self) -> bool {
        self.score > GATHER_ABOVE
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

/// Writes the acks held back from the deliveries of a burst once the tasks
/// queued behind the batch that held them have run: the deliveries go out as
/// each publish is read, the publishers' acks (each write wakes a client)
/// after the whole burst.
async fn release_behind_queued_tasks(held: Arc<crate::outbox::Held>) {
    loop {
        held.ready.notified().await;
        behind_queued_tasks().await;
        held.release();
    }
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

    /// Every inbox message is moved through the channel several times: keep
    /// the enum small (a `Publish` with its properties inline made it about
    /// 500 bytes).
    #[test]
    fn inbox_messages_stay_small() {
        let size = std::mem::size_of::<super::ToRouter>();
        assert!(size <= 64, "ToRouter is {size} bytes: box the variant that grew");
    }

    /// The router gathers from the start, stops when few batches repeat a
    /// connection (10->10: one in ten or fewer), goes on gathering when most
    /// do (fan-in), and is not tipped by a stray repeat.
    #[test]
    fn bursts_gather_while_most_batches_repeat() {
        let mut b = super::Bursts::default();
        assert!(b.gather());
        // 10->10: every tenth batch repeats.
        for i in 0..200 {
            b.after_batch(i % 10 == 0);
        }
        assert!(!b.gather(), "one batch in ten repeated: {b:?}");
        // A stray run of repeats does not start gathering.
        for _ in 0..3 {
            b.after_batch(true);
        }
        assert!(!b.gather(), "three repeats in a row after 10->10: {b:?}");
        // Fan-in: three batches in five repeat.
        for i in 0..200 {
            b.after_batch(i % 5 < 3);
            if i >= 40 {
                assert!(b.gather(), "batch {i}, three in five repeated: {b:?}");
            }
        }
        // The score stays in range when every batch repeats.
        for _ in 0..1000 {
            b.after_batch(true);
        }
        assert!(b.gather() && b.score <= super::SCORE_ONE, "{b:?}");
        for _ in 0..200 {
            b.after_batch(false);
        }
        assert!(!b.gather(), "{b:?}");
    }

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
