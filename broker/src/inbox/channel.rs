//! The router's inbox: an unbounded channel with the bound kept beside it.
//!
//! tokio's bounded channel releases a permit under its semaphore's mutex for
//! every message received; with two messages per QoS 1 message (the PUBLISH
//! and the subscriber's PUBACK) that lock, and the waiter list it guards,
//! were about a tenth of the broker's instructions per message (callgrind).
//! Here a sender only counts itself in (one atomic add) while the inbox has
//! room, and waits for the router to make room when it has none: the same
//! backpressure on publishers, without a lock on the way in or out.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::{AcqRel, Acquire};

use tokio::sync::{Notify, mpsc};

use super::ToRouter;

/// Messages waiting in the inbox beyond which senders wait. A sender that
/// found room may still add one more, so the inbox holds at most this plus
/// one message per connection.
pub const CAPACITY: usize = 8192;

struct Room {
    queued: AtomicUsize,
    freed: Notify,
}

/// The router is gone: the broker is shutting down.
#[derive(Debug)]
pub struct Closed;

/// Sending side, one clone per connection. `None` in the channel is the
/// order to stop.
#[derive(Clone)]
pub struct Sender {
    tx: mpsc::UnboundedSender<Option<ToRouter>>,
    room: Arc<Room>,
}

pub struct Receiver {
    rx: mpsc::UnboundedReceiver<Option<ToRouter>>,
    room: Arc<Room>,
}

pub fn inbox() -> (Sender, Receiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let room = Arc::new(Room { queued: AtomicUsize::new(0), freed: Notify::new() });
    (Sender { tx, room: room.clone() }, Receiver { rx, room })
}

impl Sender {
    /// Sends once the inbox has room.
    pub async fn send(&self, m: ToRouter) -> Result<(), Closed> {
        while self.room.queued.load(Acquire) >= CAPACITY {
            let mut freed = pin!(self.room.freed.notified());
            // Registered before the second look: room made after it wakes us.
            freed.as_mut().enable();
            if self.room.queued.load(Acquire) < CAPACITY {
                break;
            }
            if self.tx.is_closed() {
                return Err(Closed);
            }
            freed.await;
        }
        self.room.queued.fetch_add(1, AcqRel);
        self.tx.send(Some(m)).map_err(|_| Closed)
    }

    /// Tells the router to stop once it has handled what is already in the
    /// inbox; never waits.
    pub fn stop(&self) {
        self.room.queued.fetch_add(1, AcqRel);
        let _ = self.tx.send(None);
    }

    /// Sends without waiting for room: for the router's own ticks, which
    /// must not wait out the backpressure meant for publishers (a tick or
    /// a stop may take the inbox past `CAPACITY` by one).
    pub fn push(&self, m: ToRouter) {
        self.room.queued.fetch_add(1, AcqRel);
        let _ = self.tx.send(Some(m));
    }
}

impl Receiver {
    /// Appends up to `limit` messages to `buf`, waiting for one if there is
    /// none (0: every sender is gone).
    pub async fn recv_many(&mut self, buf: &mut Vec<Option<ToRouter>>, limit: usize) -> usize {
        let n = self.rx.recv_many(buf, limit).await;
        self.taken(n);
        n
    }

    /// One more message if one is waiting.
    pub fn try_recv(&mut self) -> Option<Option<ToRouter>> {
        let m = self.rx.try_recv().ok()?;
        self.taken(1);
        Some(m)
    }

    fn taken(&self, n: usize) {
        if n > 0 && self.room.queued.fetch_sub(n, AcqRel) >= CAPACITY {
            self.room.freed.notify_waiters();
        }
    }
}

impl Drop for Receiver {
    /// Senders waiting for room learn that none will come.
    fn drop(&mut self) {
        self.rx.close();
        self.room.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::{CAPACITY, inbox};
    use crate::inbox::ToRouter;

    fn ack(pid: u16) -> ToRouter {
        ToRouter::PubAck { conn: 1, client: Arc::from("c"), pid }
    }

    /// A full inbox holds senders back until the router takes messages,
    /// then lets them through; nothing is lost or reordered, and the stop
    /// order arrives after what was sent before it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_inbox_holds_senders_until_the_router_takes() {
        let (tx, mut rx) = inbox();
        for i in 0..CAPACITY {
            tx.send(ack(i as u16)).await.expect("room");
        }
        let late = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(ack(u16::MAX)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!late.is_finished(), "a sender went past a full inbox");
        let mut buf = Vec::new();
        assert_eq!(rx.recv_many(&mut buf, 16).await, 16);
        tokio::time::timeout(Duration::from_secs(5), late).await.expect("sender woken").expect("join").expect("sent");
        tx.stop();
        let mut pids = Vec::new();
        loop {
            buf.clear();
            rx.recv_many(&mut buf, 1024).await;
            for m in buf.drain(..) {
                match m {
                    Some(ToRouter::PubAck { pid, .. }) => pids.push(pid),
                    Some(_) => unreachable!(),
                    None => {
                        let mut want: Vec<u16> = (16..CAPACITY).map(|i| i as u16).collect();
                        want.push(u16::MAX);
                        assert_eq!(pids, want);
                        return;
                    }
                }
            }
        }
    }

    /// A sender waiting on a full inbox is told when the router is gone,
    /// instead of waiting for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_sender_learns_the_router_is_gone() {
        let (tx, rx) = inbox();
        for i in 0..CAPACITY {
            tx.send(ack(i as u16)).await.expect("room");
        }
        let waiting = tokio::spawn(async move { tx.send(ack(0)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a sender went past a full inbox");
        drop(rx);
        let sent = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("sender woken").expect("join");
        assert!(sent.is_err(), "sent to a router that is gone");
    }
}
