//! Acknowledgements to a publisher that wait for something: a store commit,
//! the peers' acks of the message's forwards (or the commit that put those
//! forwards on disk), or both. They go out in the order the publishes came
//! in (MQTT 4.6), whatever order their conditions are met in.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::codec::Packet;
use crate::message::Outbound;
use crate::outbox::Outbox;

/// One connection's acks that wait, oldest first.
#[derive(Default)]
pub struct AckQueue {
    q: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    /// Number of the first slot.
    base: u64,
    slots: VecDeque<Slot>,
}

struct Slot {
    pkt: Packet,
    /// Conditions not met yet.
    waiting: u32,
    /// False once a condition failed (a commit that did not make it to
    /// disk): the ack is withheld, the client resends.
    ok: bool,
}

impl AckQueue {
    /// Sends `pkt` once `waiting` conditions are met (each reported with
    /// `done(seq, ..)`) and every ack queued before it is out. Returns its
    /// number, `None` when it went out at once.
    pub fn push(&self, tx: &Arc<Outbox>, pkt: Packet, waiting: u32) -> Option<u64> {
        let mut p = self.q.lock().expect("ack queue lock");
        if waiting == 0 && p.slots.is_empty() {
            drop(p);
            let _ = tx.send(Outbound::packet(pkt));
            return None;
        }
        let seq = p.base + p.slots.len() as u64;
        p.slots.push_back(Slot { pkt, waiting, ok: true });
        Some(seq)
    }

    /// Whether acks are waiting (a later one must queue behind them).
    pub fn busy(&self) -> bool {
        !self.q.lock().expect("ack queue lock").slots.is_empty()
    }

    /// One condition of ack `seq` is met (`ok`) or failed.
    pub fn done(&self, tx: &Arc<Outbox>, seq: u64, ok: bool) {
        let mut p = self.q.lock().expect("ack queue lock");
        let Some(i) = seq.checked_sub(p.base) else { return };
        let Some(s) = p.slots.get_mut(i as usize) else { return };
        s.waiting = s.waiting.saturating_sub(1);
        s.ok &= ok;
        // Sent under the lock: two threads finishing slots at once must
        // not reorder them on the wire.
        while p.slots.front().is_some_and(|s| s.waiting == 0) {
            let s = p.slots.pop_front().expect("front");
            p.base += 1;
            if s.ok {
                let _ = tx.send(Outbound::packet(s.pkt));
            }
        }
    }
}

/// What one publish waits for from the cluster: every forward of it that
/// the publisher's ack depends on holds the gate once; when the last lets
/// go (its peer acked it, or it is on disk) the bound callback runs.
pub struct Gate {
    /// Forwards holding it, plus one until `bind` (so it cannot open
    /// before it is bound).
    pending: AtomicUsize,
    then: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Gate {
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate { pending: AtomicUsize::new(1), then: Mutex::new(None) })
    }

    /// A forward holds the gate.
    pub fn hold(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether any forward holds it.
    pub fn held(&self) -> bool {
        self.pending.load(Ordering::Acquire) > 1
    }

    /// A forward lets go (at most once per `hold`).
    pub fn open(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(f) = self.then.lock().expect("gate lock").take()
        {
            f();
        }
    }

    /// Runs `f` once every holder has let go (perhaps at once).
    pub fn bind(&self, f: impl FnOnce() + Send + 'static) {
        *self.then.lock().expect("gate lock") = Some(Box::new(f));
        self.open();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_opens_after_bind_and_every_holder() {
        let hit = Arc::new(AtomicUsize::new(0));
        let g = Gate::new();
        g.hold();
        g.hold();
        g.open();
        let h = hit.clone();
        g.bind(move || {
            h.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hit.load(Ordering::Relaxed), 0, "one holder left");
        g.open();
        assert_eq!(hit.load(Ordering::Relaxed), 1);
        let g = Gate::new();
        let h = hit.clone();
        g.bind(move || {
            h.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hit.load(Ordering::Relaxed), 2, "no holder: opens at bind");
    }
}
