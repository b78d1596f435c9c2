//! One task pair per client connection: the reader (this module) decodes
//! packets, enforces per-connection rules (keep alive, topic aliases, receive
//! maximum, packet size) and forwards the rest to the router; what the
//! router, the reader and the store send back goes through the connection's
//! outbox (`crate::outbox`), written at once or by the connection's writer task.

mod connect;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering, Ordering::Relaxed};
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::codec::{self, DecodeError, Packet, QoS, Version, reason};
use crate::config::Config;
use crate::inbox::{ConnHandle, ToRouter};
use crate::message::Outbound;
use crate::metrics::{CloseReason, Metrics};
use crate::outbox::{self, Outbox};

/// What every connection task shares.
pub struct Shared {
    pub cfg: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub router: crate::inbox::Sender,
    pub auth: Option<Auth>,
    pub next_id: AtomicU64,
    /// The cluster, when this node is part of one: a CONNECT takes the
    /// client's session over from the other nodes first.
    pub cluster: Option<crate::cluster::Outlet>,
}

/// Why the reader stopped.
struct End {
    reason: CloseReason,
    /// v5 reason code to send in a DISCONNECT, when the broker closes.
    send: Option<u8>,
    publish_will: bool,
    session_expiry: Option<u32>,
    detail: Option<String>,
}

impl End {
    fn bad(reason: CloseReason, code: u8, detail: impl Into<String>) -> End {
        End { reason, send: Some(code), publish_will: true, session_expiry: None, detail: Some(detail.into()) }
    }
    fn quiet(reason: CloseReason) -> End {
        End { reason, send: None, publish_will: true, session_expiry: None, detail: None }
    }
}

fn decode_end(e: &DecodeError) -> End {
    let reason = match e {
        DecodeError::Malformed(_) => CloseReason::Malformed,
        DecodeError::Protocol(_) => CloseReason::ProtocolError,
        DecodeError::TooLarge { .. } => CloseReason::PacketTooLarge,
        DecodeError::UnsupportedVersion { .. } => CloseReason::UnsupportedVersion,
    };
    End::bad(reason, e.reason_code(), e.to_string())
}

/// Why the watchdog stopped a reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    KeepAlive = 1,
    Local = 2,
    Shutdown = 3,
}

/// What a reader and its watchdog share: the reader counts its reads, the
/// watchdog sets `why` once and wakes it.
#[derive(Default)]
struct Watch {
    why: AtomicU8,
    waker: atomic_waker::AtomicWaker,
    reads: AtomicU64,
}

impl Watch {
    fn stop(&self, why: Stop) {
        if self.why.compare_exchange(0, why as u8, Ordering::Release, Relaxed).is_ok() {
            self.waker.wake();
        }
    }

    fn stopped(&self) -> Option<Stop> {
        match self.why.load(Ordering::Acquire) {
            0 => None,
            1 => Some(Stop::KeepAlive),
            2 => Some(Stop::Local),
            _ => Some(Stop::Shutdown),
        }
    }
}

/// Stops the reader when the client has sent nothing for `timeout` (keep
/// alive), when the connection's writer stops (`local`) or when the broker
/// shuts down. Keep alive is checked an eighth of the timeout apart, from the
/// reader's count of reads: a silent client is closed between 1 and 1.125
/// times the timeout after its last packet, never before.
async fn watchdog(watch: Arc<Watch>, timeout: Option<Duration>, local: CancellationToken, shutdown: CancellationToken) {
    let period = timeout.map_or(Duration::from_secs(3600), |t| (t / 8).max(Duration::from_millis(10)));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = (watch.reads.load(Relaxed), Instant::now());
    let why = loop {
        tokio::select! {
            now = tick.tick(), if timeout.is_some() => {
                let reads = watch.reads.load(Relaxed);
                if reads != seen.0 {
                    seen = (reads, now);
                } else if timeout.is_some_and(|t| now.duration_since(seen.1) >= t) {
                    break Stop::KeepAlive;
                }
            }
            () = local.cancelled() => break Stop::Local,
            () = shutdown.cancelled() => break Stop::Shutdown,
        }
    };
    watch.stop(why);
}

pub async fn serve(stream: TcpStream, peer: SocketAddr, sh: Arc<Shared>, shutdown: CancellationToken) {
    sh.metrics.connections_total.fetch_add(1, Relaxed);
    sh.metrics.connections_current.fetch_add(1, Relaxed);
    let _ = stream.set_nodelay(true);
    // TCP keepalive finds half-open connections of clients that asked for
    // MQTT keep alive 0 (which disables the 1.5x rule): about 90 s.
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&ka);
    let reason = run(stream, peer, &sh, shutdown).await;
    sh.metrics.closed(reason);
    sh.metrics.connections_current.fetch_sub(1, Relaxed);
}

async fn run(stream: TcpStream, peer: SocketAddr, sh: &Arc<Shared>, shutdown: CancellationToken) -> CloseReason {
    let id = sh.next_id.fetch_add(1, Relaxed);
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(4096);
    let accepted = match connect::accept(&mut rd, &mut wr, &mut buf, sh, id, peer).await {
        Ok(a) => a,
        Err(reason) => return reason,
    };
    let version = accepted.connect.version;
    let client: Arc<str> = Arc::from(accepted.client_id.as_str());
    let qos0_pending = Arc::new(AtomicUsize::new(0));
    let inflight_in = Arc::new(AtomicUsize::new(0));
    let throttle = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let local = CancellationToken::new();
    let close_code = Arc::new(AtomicU8::new(0));
    let tx = Outbox::new(
        wr,
        outbox::Config {
            version,
            alias_max: accepted.connect.props.topic_alias_maximum.unwrap_or(0),
            metrics: sh.metrics.clone(),
            qos0_pending: qos0_pending.clone(),
            inflight_in: inflight_in.clone(),
            close_code: close_code.clone(),
            local: local.clone(),
        },
    );
    let conn = ConnHandle {
        id,
        tx: tx.clone(),
        version,
        receive_max: accepted.connect.props.receive_maximum.unwrap_or(u16::MAX).min(sh.cfg.max_inflight).max(1),
        max_packet: accepted.connect.props.maximum_packet_size.unwrap_or(u32::MAX),
        qos0_pending,
        acks: Arc::default(),
        throttle: throttle.clone(),
    };
    let writer = tokio::spawn(outbox::run(tx.clone()));
    let connect_expiry = accepted.connect.props.session_expiry.unwrap_or(0);
    let moved = match &sh.cluster {
        Some(c) => c.take_session(&accepted.client_id, accepted.connect.clean_start).await,
        None => None,
    };
    let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
    let sent = sh
        .router
        .send(ToRouter::Connect {
            conn,
            req: Box::new(crate::inbox::ConnectReq { connect: accepted.connect, connack: accepted.connack, moved }),
            reply: reply_tx,
        })
        .await;
    if sent.is_err() || reply_rx.await.is_err() {
        local.cancel();
        let _ = writer.await;
        return CloseReason::Shutdown;
    }
    let mut reader = Reader {
        sh,
        id,
        client: client.clone(),
        version,
        tx: tx.clone(),
        aliases: std::collections::HashMap::new(),
        inflight_in,
        qos2_in: std::collections::HashSet::new(),
        connect_expiry,
        throttle,
    };
    let ka = accepted.keep_alive;
    let end = reader.read_loop(&mut rd, &mut buf, ka, &local, &shutdown, &close_code).await;
    if let Some(detail) = &end.detail {
        tracing::warn!(%peer, client = %client, reason = end.reason.label(), "closing connection: {detail}");
    } else {
        tracing::debug!(%peer, client = %client, reason = end.reason.label(), "connection closed");
    }
    match end.send {
        Some(code) => {
            let _ = tx.send(Outbound::Close(code));
        }
        None => local.cancel(),
    }
    let _ = sh
        .router
        .send(ToRouter::Disconnected {
            conn: id,
            client,
            publish_will: end.publish_will,
            session_expiry: end.session_expiry,
        })
        .await;
    drop(tx);
    // Let the writer flush the DISCONNECT; never wait on a peer that stopped reading.
    if tokio::time::timeout(Duration::from_secs(2), writer).await.is_err() {
        local.cancel();
    }
    end.reason
}

struct Reader<'a> {
    sh: &'a Arc<Shared>,
    id: u64,
    client: Arc<str>,
    version: Version,
    tx: Arc<Outbox>,
    aliases: std::collections::HashMap<u16, String>,
    /// Incoming QoS 1/2 publishes not yet acknowledged (receive maximum);
    /// the outbox decrements it as PUBACK/PUBCOMP go out.
    inflight_in: Arc<AtomicUsize>,
    qos2_in: std::collections::HashSet<u16>,
    connect_expiry: u32,
    /// See `ConnHandle::throttle`.
    throttle: Arc<std::sync::atomic::AtomicBool>,
}

impl Reader<'_> {
    async fn read_loop(
        &mut self,
        rd: &mut OwnedReadHalf,
        buf: &mut BytesMut,
        keep_alive: u16,
        local: &CancellationToken,
        shutdown: &CancellationToken,
        close_code: &AtomicU8,
    ) -> End {
        // MQTT 3.1.2.10: one and a half times the keep alive.
        let timeout = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let max = self.sh.cfg.max_packet_size as usize;
        let watch = Arc::new(Watch::default());
        let dog = tokio::spawn(watchdog(watch.clone(), timeout, local.clone(), shutdown.clone()));
        let end = self.read_packets(rd, buf, max, &watch).await;
        dog.abort();
        end.unwrap_or_else(|why| match why {
            Stop::KeepAlive => {
                End::bad(CloseReason::KeepAliveTimeout, reason::KEEP_ALIVE_TIMEOUT, "keep alive timeout")
            }
            Stop::Local => {
                // The writer stopped: after a Close it was asked to send,
                // or because writing failed (the peer is gone).
                let (reason, publish_will) = match close_code.load(Relaxed) {
                    reason::SESSION_TAKEN_OVER => (CloseReason::Takeover, false),
                    reason::SERVER_SHUTTING_DOWN => (CloseReason::Shutdown, true),
                    0 => (CloseReason::IoError, true),
                    _ => (CloseReason::ProtocolError, true),
                };
                End { reason, send: None, publish_will, session_expiry: None, detail: None }
            }
            Stop::Shutdown => End { send: Some(reason::SERVER_SHUTTING_DOWN), ..End::quiet(CloseReason::Shutdown) },
        })
    }

    /// Reads and handles packets until the connection ends (`Ok`) or the
    /// watchdog stops it (`Err`). The only future awaited per packet is the
    /// read: keep alive, the writer's end and the broker's shutdown are
    /// watched by a task of their own, which is woken only when one of them
    /// is due. Polling a timer and two cancellation tokens beside every read
    /// (a `select!`) cost about 1,800 instructions per QoS 1 message (callgrind:
    /// tokio's `Notify` locks its waiter list on every poll).
    async fn read_packets(
        &mut self,
        rd: &mut OwnedReadHalf,
        buf: &mut BytesMut,
        max: usize,
        watch: &Watch,
    ) -> Result<End, Stop> {
        let mut reads = 0u64;
        loop {
            loop {
                match codec::decode(buf, self.version, max) {
                    Ok(Some(p)) => match self.handle(p) {
                        Ok(None) => {}
                        Ok(Some(m)) => {
                            if let Some(end) = self.to_router(m).await {
                                return Ok(end);
                            }
                        }
                        Err(end) => return Ok(end),
                    },
                    Ok(None) => break,
                    Err(e) => return Ok(decode_end(&e)),
                }
            }
            // A peer's forward queue is filling up with what this client
            // publishes: read no more until it drains (bounded wait).
            if self.throttle.load(Relaxed)
                && let Some(c) = &self.sh.cluster
            {
                self.throttle.store(false, Relaxed);
                c.drained().await;
            }
            let read = std::future::poll_fn(|cx| {
                // Registered before the check: a stop set after it wakes us.
                watch.waker.register(cx.waker());
                if let Some(why) = watch.stopped() {
                    return Poll::Ready(Err(why));
                }
                let fut = rd.read_buf(buf);
                tokio::pin!(fut);
                fut.poll(cx).map(Ok)
            })
            .await?;
            match read {
                Ok(0) => return Ok(End::quiet(CloseReason::Eof)),
                Ok(_) => {
                    reads += 1;
                    watch.reads.store(reads, Relaxed);
                }
                Err(_) => return Ok(End::quiet(CloseReason::IoError)),
            }
        }
    }

    async fn to_router(&self, m: ToRouter) -> Option<End> {
        match self.sh.router.send(m).await {
            Ok(()) => None,
            Err(_) => Some(End { send: Some(reason::SERVER_SHUTTING_DOWN), ..End::quiet(CloseReason::Shutdown) }),
        }
    }

    /// Handles one packet: what to send the router, or why the connection
    /// ends. Not async, so that the packet (a v5 `Publish` is about 500
    /// bytes) is not copied into the reader's future on its way.
    fn handle(&mut self, p: Packet) -> Result<Option<ToRouter>, End> {
        tracing::trace!(client = %self.client, packet = p.name(), "received");
        let (conn, client) = (self.id, self.client.clone());
        let v5 = self.version == Version::V5;
        match p {
            Packet::Publish(mut p) => {
                if let Some(a) = p.props.topic_alias {
                    if a == 0 || a > self.sh.cfg.topic_alias_maximum {
                        return Err(End::bad(
                            CloseReason::TopicAliasInvalid,
                            reason::TOPIC_ALIAS_INVALID,
                            "topic alias out of range",
                        ));
                    }
                    if p.topic.is_empty() {
                        match self.aliases.get(&a) {
                            Some(t) => p.topic = t.clone(),
                            None => {
                                return Err(End::bad(
                                    CloseReason::ProtocolError,
                                    reason::PROTOCOL_ERROR,
                                    "unknown topic alias",
                                ));
                            }
                        }
                    } else {
                        self.aliases.insert(a, p.topic.clone());
                    }
                }
                if !crate::topic::valid_name(&p.topic) {
                    return Err(End::bad(
                        CloseReason::TopicNameInvalid,
                        reason::TOPIC_NAME_INVALID,
                        format!("invalid topic name {:?}", p.topic),
                    ));
                }
                let limit = usize::from(self.sh.cfg.receive_maximum);
                match p.qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => {
                        if self.inflight_in.fetch_add(1, Relaxed) + 1 > limit && v5 {
                            return Err(End::bad(
                                CloseReason::ReceiveMaxExceeded,
                                reason::RECEIVE_MAX_EXCEEDED,
                                "receive maximum exceeded",
                            ));
                        }
                    }
                    QoS::ExactlyOnce => {
                        if self.qos2_in.insert(p.pid) && self.inflight_in.fetch_add(1, Relaxed) + 1 > limit && v5 {
                            return Err(End::bad(
                                CloseReason::ReceiveMaxExceeded,
                                reason::RECEIVE_MAX_EXCEEDED,
                                "receive maximum exceeded",
                            ));
                        }
                    }
                }
                Ok(Some(ToRouter::Publish { conn, client, publish: Box::new(p) }))
            }
            Packet::PubAck(a) => Ok(Some(ToRouter::PubAck { conn, client, pid: a.pid })),
            Packet::PubRec(a) => Ok(Some(ToRouter::PubRec { conn, client, pid: a.pid, code: a.code })),
            Packet::PubComp(a) => Ok(Some(ToRouter::PubComp { conn, client, pid: a.pid })),
            Packet::PubRel(a) => {
                if !self.qos2_in.remove(&a.pid) {
                    // PUBREL for a message of an earlier connection: the
                    // outbox will still decrement for its PUBCOMP.
                    self.inflight_in.fetch_add(1, Relaxed);
                }
                Ok(Some(ToRouter::PubRel { conn, client, pid: a.pid }))
            }
            Packet::Subscribe(s) => {
                if s.props.subscription_ids.len() > 1 {
                    return Err(End::bad(
                        CloseReason::ProtocolError,
                        reason::PROTOCOL_ERROR,
                        "several subscription identifiers",
                    ));
                }
                Ok(Some(ToRouter::Subscribe { conn, client, sub: Box::new(s) }))
            }
            Packet::Unsubscribe(u) => Ok(Some(ToRouter::Unsubscribe { conn, client, unsub: Box::new(u) })),
            Packet::PingReq => {
                let _ = self.tx.send(Outbound::packet(Packet::PingResp));
                Ok(None)
            }
            Packet::Disconnect(d) => {
                if let Some(e) = d.props.session_expiry
                    && self.connect_expiry == 0
                    && e != 0
                {
                    return Err(End::bad(
                        CloseReason::ProtocolError,
                        reason::PROTOCOL_ERROR,
                        "session expiry set on DISCONNECT after 0 on CONNECT",
                    ));
                }
                Err(End {
                    reason: CloseReason::ClientDisconnect,
                    send: None,
                    publish_will: d.code == reason::DISCONNECT_WITH_WILL,
                    session_expiry: d.props.session_expiry,
                    detail: None,
                })
            }
            other => Err(End::bad(
                CloseReason::ProtocolError,
                reason::PROTOCOL_ERROR,
                format!("unexpected {} from a client", other.name()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::time::{Instant, sleep};
    use tokio_util::sync::CancellationToken;

    use super::{Stop, Watch, watchdog};

    /// A reader that keeps reading is left alone; once silent it is stopped
    /// no sooner than the keep-alive timeout and not much later.
    #[tokio::test]
    async fn watchdog_stops_a_silent_reader_after_the_timeout() {
        let w = Arc::new(Watch::default());
        let t = Duration::from_millis(400);
        let dog = tokio::spawn(watchdog(w.clone(), Some(t), CancellationToken::new(), CancellationToken::new()));
        for i in 1..=10 {
            sleep(Duration::from_millis(100)).await;
            w.reads.store(i, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(w.stopped(), None, "stopped while reading, after {i} reads");
        }
        let last = Instant::now();
        while w.stopped().is_none() {
            assert!(last.elapsed() < 2 * t, "still not stopped {:?} after the last read", last.elapsed());
            sleep(Duration::from_millis(5)).await;
        }
        let after = last.elapsed();
        assert_eq!(w.stopped(), Some(Stop::KeepAlive));
        assert!(after >= t, "stopped {after:?} after the last read, before the timeout {t:?}");
        // An eighth of the timeout late at most, plus scheduling slack.
        assert!(after <= t + t / 8 + Duration::from_millis(150), "stopped {after:?} after the last read");
        dog.await.expect("watchdog");
    }

    /// The writer's end and the broker's shutdown stop the reader at once
    /// and wake it, whatever keep alive says.
    #[tokio::test]
    async fn watchdog_stops_on_cancellation_and_wakes_the_reader() {
        for shut in [false, true] {
            let w = Arc::new(Watch::default());
            let (local, shutdown) = (CancellationToken::new(), CancellationToken::new());
            let dog = tokio::spawn(watchdog(w.clone(), None, local.clone(), shutdown.clone()));
            let reader = {
                let w = w.clone();
                tokio::spawn(std::future::poll_fn(move |cx| {
                    w.waker.register(cx.waker());
                    w.stopped().map_or(std::task::Poll::Pending, std::task::Poll::Ready)
                }))
            };
            sleep(Duration::from_millis(20)).await;
            if shut {
                shutdown.cancel()
            } else {
                local.cancel()
            }
            let why = tokio::time::timeout(Duration::from_secs(5), reader).await.expect("reader woken").expect("join");
            assert_eq!(why, if shut { Stop::Shutdown } else { Stop::Local });
            dog.await.expect("watchdog");
        }
    }
}
