//! The processes connected to chaosd's API socket. Process faults never act
//! on them, for the reason they never act on chaosd itself: a client may be
//! what recovers the fault (an orchestrator, a script waiting for its reply,
//! a `chaosctl watch`), and `kill --name chaosctl` would otherwise kill the
//! very chaosctl that asked, before it reads the reply.
//!
//! The server registers each connection when it accepts it, with the peer
//! credentials of the socket (SO_PEERCRED, the pid in chaosd's pid
//! namespace), and the registration ends when the connection closes. The
//! registry is process-wide for the same reason `std::process::id()` is: it
//! is a fact about this daemon, not about one request.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use super::procfs::{self, ProcId};

static CONNECTED: Mutex<BTreeMap<u64, ProcId>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

/// How many notes of spared clients are kept for replies not yet sent.
const MAX_NOTES: usize = 64;

/// Spared clients by experiment id, for the reply to the request (see
/// `take_spared`).
static SPARED: Mutex<Vec<(String, Vec<Spared>)>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One connection's registration; dropping it ends the registration.
#[derive(Debug)]
pub struct Registration(Option<u64>);

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(key) = self.0 {
            lock(&CONNECTED).remove(&key);
        }
    }
}

/// Registers the peer of a new connection. `pid` is the peer's pid as the
/// kernel reported it at connect time; None or 0 (a peer in a pid namespace
/// chaosd cannot see into) cannot be identified, and so cannot be targeted
/// by pid or name from here either.
pub fn register(pid: Option<i32>) -> Registration {
    let Some(pid) = pid.and_then(|p| u32::try_from(p).ok()).filter(|p| *p != 0) else {
        return Registration(None);
    };
    // Pid and start time: a client that exits frees its pid, and an
    // unrelated process that gets it must not be spared.
    let Some((id, _)) = procfs::identify(pid) else { return Registration(None) };
    let key = NEXT.fetch_add(1, Ordering::Relaxed);
    lock(&CONNECTED).insert(key, id);
    Registration(Some(key))
}

/// The processes connected now (each once, and only while still alive).
pub fn connected() -> Vec<ProcId> {
    let mut v: Vec<ProcId> = lock(&CONNECTED).values().copied().filter(|id| procfs::is_alive(*id)).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// A client a fault would have included and did not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spared {
    pub pid: u32,
    pub comm: String,
}

impl std::fmt::Display for Spared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.comm)
    }
}

/// Remembers that experiment `id` spared `who`, so the service can say so
/// in its reply.
pub fn note_spared(id: &str, who: Vec<Spared>) {
    if who.is_empty() {
        return;
    }
    let mut notes = lock(&SPARED);
    notes.retain(|(k, _)| k != id);
    // Bounded: a note whose reply is never sent (a driver called outside
    // the service, as in tests) must not accumulate.
    if notes.len() >= MAX_NOTES {
        notes.remove(0);
    }
    notes.push((id.to_string(), who));
}

/// The clients experiment `id` spared when it was applied (once).
pub fn take_spared(id: &str) -> Vec<Spared> {
    let mut notes = lock(&SPARED);
    match notes.iter().position(|(k, _)| k == id) {
        Some(i) => notes.remove(i).1,
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_lasts_as_long_as_its_connection() {
        let me = procfs::identify(std::process::id()).unwrap().0;
        let a = register(Some(std::process::id() as i32));
        let b = register(Some(std::process::id() as i32));
        assert_eq!(connected().iter().filter(|i| **i == me).count(), 1, "listed once");
        drop(a);
        assert!(connected().contains(&me), "still connected by the other");
        drop(b);
        assert!(!connected().contains(&me));
        // Unidentifiable peers are not registered.
        drop(register(None));
        drop(register(Some(0)));
    }

    #[test]
    fn notes_are_taken_once() {
        note_spared("x1", vec![Spared { pid: 7, comm: "chaosctl".into() }]);
        assert_eq!(take_spared("x1").len(), 1);
        assert!(take_spared("x1").is_empty());
        for i in 0..(MAX_NOTES + 10) {
            note_spared(&format!("n{i}"), vec![Spared { pid: 7, comm: "c".into() }]);
        }
        assert!(lock(&SPARED).len() <= MAX_NOTES);
    }
}
