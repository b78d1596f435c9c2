//! Randomized soak of the network datapath through the real daemon and the
//! real chaosctl: random injects (partition, 100% and 60% loss, 8kbit
//! bandwidth; TCP and UDP; egress, ingress, both; some with IPv4/IPv6
//! `--peer` CIDRs, some named `--device`, some with durations that expire
//! during the run), recovers (one, `--all`), waits for expiries, SIGKILL +
//! restart within and after the grace period, SIGSTOP + SIGCONT shorter and
//! longer than the grace period, a second daemon on its own socket, state
//! dir and BPF dir started and stopped beside the first, and second daemons
//! that would share the first one's socket, state dir or BPF dir (they must
//! refuse to start).
//!
//! After every step an oracle compares three views: the test's model of
//! what should be active, `chaosctl list --output json`, and the kernel:
//! traffic that each active fault selects behaves as the fault says (in its
//! direction, to its peers, on its protocol), traffic it does not select
//! passes, a port no fault selects passes both ways, the counters `list`
//! shows grew by exactly the datagrams sent through each UDP fault, and
//! nothing chaosd-marked (IFB devices, HTB roots `c4a0:`, chaosd tc filters,
//! TCX programs per direction, rules and device entries in the pinned maps)
//! exists without an active experiment that needs it. Faults share ports
//! (other direction, protocol or peers) so that they meet on one device.
//!
//! The test only asks for what the daemon must accept (the faults of one
//! daemon never overlap by the daemon's own rule), so a refused inject is
//! a failure too. Other chaosd daemons on the host (other tests) sweep every
//! namespace at start: a failure names those seen during the run.
//!
//! Environment:
//! - `CHAOSD_SOAK_SEED`: replay a run (the seed is printed first and in every
//!   failure). Timing (expiries, restarts) can make a replay diverge after a
//!   while; the early steps are the same.
//! - `CHAOSD_SOAK_SECS`: how long steps are taken (default 100).
//! - `CHAOSD_SOAK_GRACE_MS`: the daemon's `--grace` (default 3000).
//! - `CHAOSD_SOAK_SKIP`: comma-separated things not to do, to look past a
//!   known defect: step kinds (`inject`, `recover`, `recover-all`, `expiry`,
//!   `kill-quick`, `kill-slow`, `stop-short`, `stop-long`, `second`,
//!   `shared-socket`, `shared-state`, `shared-bpf`), `bandwidth-both` (no
//!   bandwidth fault in both directions), `shared-port` (every fault on a
//!   port of its own), `default-devices` (every fault names `--device`).
//!
//! `CHAOSD_SOAK_SEED=N cargo test --release -p chaosd --test soak -- --nocapture`

mod soak_support;

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    fmt::Write as _,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use serde_json::Value;
use soak_support::*;

// ------------------------------------------------------------------ model

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Partition,
    Loss100,
    Loss60,
    Bandwidth,
}

impl Action {
    fn drops_all(self) -> bool {
        matches!(self, Action::Partition | Action::Loss100)
    }
    fn name(self) -> &'static str {
        match self {
            Action::Partition => "partition",
            Action::Loss100 | Action::Loss60 => "loss",
            Action::Bandwidth => "bandwidth",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Egress,
    Ingress,
    Both,
}

impl Dir {
    fn egress(self) -> bool {
        self != Dir::Ingress
    }
    fn ingress(self) -> bool {
        self != Dir::Egress
    }
    fn name(self) -> &'static str {
        match self {
            Dir::Egress => "egress",
            Dir::Ingress => "ingress",
            Dir::Both => "both",
        }
    }
}

/// What the test asked a daemon for.
#[derive(Clone, Debug)]
struct Fault {
    id: String,
    /// 1: the main daemon; 2: a second daemon beside it.
    owner: usize,
    target: Side,
    proto: Proto,
    port: u16,
    /// `--dport` instead of `--port` (either end).
    dport_only: bool,
    dir: Dir,
    /// `--peer` CIDRs: the primary prefix of these families.
    peers: Vec<Fam>,
    /// Named with `--device` (otherwise the daemon's default device set).
    device: bool,
    action: Action,
    /// Earliest and latest instant the duration can end it.
    ends: Option<(Instant, Instant)>,
    /// A restart whose timing cannot tell resumed from ended: the next
    /// `list` decides (and the kernel must agree with it).
    either: bool,
}

impl Fault {
    fn summary(&self) -> String {
        let act = match self.action {
            Action::Partition => "partition".to_string(),
            Action::Loss100 => "loss 100%".into(),
            Action::Loss60 => "loss 60%".into(),
            Action::Bandwidth => "bandwidth 8kbit".into(),
        };
        let proto = if self.proto == Proto::Tcp { "tcp" } else { "udp" };
        let port = if self.dport_only { "dport" } else { "port" };
        let mut s = format!("{} {act} {proto} {port} {} {} on {:?}", self.id, self.port, self.dir.name(), self.target);
        if !self.peers.is_empty() {
            let p: Vec<&str> = self.peers.iter().map(|f| Net::peer_cidr(*f)).collect();
            let _ = write!(s, " peer {}", p.join(","));
        }
        if self.device {
            s += " --device";
        }
        if self.owner != 1 {
            let _ = write!(s, " (daemon #{})", self.owner);
        }
        s
    }

    fn args(&self, net: &Net, duration: Option<Duration>) -> Vec<String> {
        let mut a: Vec<String> = vec!["inject".into(), "network".into(), self.action.name().into()];
        a.extend(["--netns".into(), net.ns(self.target).to_string()]);
        a.extend(["--protocol".into(), if self.proto == Proto::Tcp { "tcp" } else { "udp" }.into()]);
        a.extend([if self.dport_only { "--dport" } else { "--port" }.into(), self.port.to_string()]);
        a.extend(["--direction".into(), self.dir.name().into()]);
        for p in &self.peers {
            a.extend(["--peer".into(), Net::peer_cidr(*p).into()]);
        }
        if self.device {
            a.extend(["--device".into(), Net::dev(self.target).into()]);
        }
        match self.action {
            Action::Loss100 => a.extend(["--percent".into(), "100".into()]),
            Action::Loss60 => a.extend(["--percent".into(), "60".into()]),
            Action::Bandwidth => a.extend(["--rate".into(), "8kbit".into()]),
            Action::Partition => {}
        }
        if let Some(d) = duration {
            a.extend(["--duration".into(), format!("{}ms", d.as_millis())]);
        }
        a
    }

    /// Whether the fault selects a packet from `src` with these ports, in
    /// the two-namespace topology (every packet leaves one side and enters
    /// the other).
    fn selects(&self, p: &Pkt) -> bool {
        let egress = p.src == self.target;
        if (egress && !self.dir.egress()) || (!egress && !self.dir.ingress()) {
            return false;
        }
        if p.proto != self.proto {
            return false;
        }
        let port = if self.dport_only { p.dport == self.port } else { p.sport == self.port || p.dport == self.port };
        if !port {
            return false;
        }
        // Both ends of a flow use the same prefix: the remote address is in
        // a peer CIDR when the flow runs in a named family's primary prefix.
        self.peers.is_empty() || (p.pfx == Pfx::Primary && self.peers.contains(&p.fam))
    }

    /// Certainly in force (by time) until at least `now + ahead`.
    fn certain_until(&self, now: Instant, ahead: Duration) -> bool {
        !self.either && self.ends.is_none_or(|(lo, _)| now + ahead + Duration::from_millis(300) < lo)
    }

    /// Certainly ended by its duration at `now`.
    fn certainly_expired(&self, now: Instant) -> bool {
        self.ends.is_some_and(|(_, hi)| now > hi + Duration::from_millis(1500))
    }

    /// Its duration may have ended it by `now`.
    fn may_have_expired(&self, now: Instant) -> bool {
        self.ends.is_some_and(|(lo, _)| now + Duration::from_millis(300) >= lo)
    }
}

#[derive(Clone, Copy, Debug)]
struct Pkt {
    src: Side,
    proto: Proto,
    sport: u16,
    dport: u16,
    fam: Fam,
    pfx: Pfx,
}

/// How a probe measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// 20 small datagrams (200 for a 60% loss).
    UdpCount,
    /// 40 datagrams of 1000 bytes (against a bandwidth limit).
    UdpBulk,
    /// TCP connects.
    TcpConnect,
    /// 64 KiB over one TCP connection.
    TcpBulk,
}

impl Kind {
    fn of(proto: Proto, bandwidth: bool) -> Kind {
        match (proto, bandwidth) {
            (Proto::Udp, false) => Kind::UdpCount,
            (Proto::Udp, true) => Kind::UdpBulk,
            (Proto::Tcp, false) => Kind::TcpConnect,
            (Proto::Tcp, true) => Kind::TcpBulk,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Everything arrives.
    Full,
    /// Nothing arrives.
    Zero,
    /// 60% loss: between 15% and 75% arrive.
    Partial,
    /// 8kbit: far less than sent arrives within the window.
    Shaped,
}

impl Expect {
    fn text(self) -> &'static str {
        match self {
            Expect::Full => "everything to arrive",
            Expect::Zero => "nothing to arrive",
            Expect::Partial => "15%..75% to arrive (60% loss)",
            Expect::Shaped => "at most a quarter to arrive within the window (8kbit)",
        }
    }
}

const UDP_N: u32 = 20;
const UDP_LOSS_N: u32 = 200;
const BULK_N: u32 = 40;
const BULK_SIZE: usize = 1000;
const TCP_BULK: usize = 64 * 1024;
/// Most faults active on the main daemon at once.
const MAX_ACTIVE: usize = 5;

/// The outcome `faults` predict for `kind` along `flow`; None when it is
/// not decidable (a fault whose end is near, or effects that combine).
fn predict(flow: &Flow, kind: Kind, faults: &[Fault], now: Instant) -> Option<Expect> {
    const EPH: u16 = 0; // ephemeral ports never equal a fault's port
    let fwd = Pkt { src: flow.from, proto: flow.proto, sport: EPH, dport: flow.port, fam: flow.fam, pfx: flow.pfx };
    let rev = Pkt { src: flow.to(), proto: flow.proto, sport: flow.port, dport: EPH, fam: flow.fam, pfx: flow.pfx };
    let ahead = Duration::from_secs(4);
    let mf: Vec<&Fault> = faults.iter().filter(|f| f.selects(&fwd)).collect();
    let mr: Vec<&Fault> =
        if flow.proto == Proto::Tcp { faults.iter().filter(|f| f.selects(&rev)).collect() } else { vec![] };
    if mf.iter().chain(mr.iter()).any(|f| !f.certain_until(now, ahead)) {
        return None;
    }
    let any = |v: &[&Fault], p: fn(Action) -> bool| v.iter().any(|f| p(f.action));
    match kind {
        Kind::UdpCount => {
            if mf.is_empty() {
                Some(Expect::Full)
            } else if any(&mf, Action::drops_all) {
                Some(Expect::Zero)
            } else if mf.iter().all(|f| f.action == Action::Loss60) {
                Some(Expect::Partial)
            } else {
                None
            }
        }
        Kind::UdpBulk => {
            if mf.is_empty() {
                Some(Expect::Full)
            } else if any(&mf, Action::drops_all) {
                Some(Expect::Zero)
            } else if mf.iter().all(|f| f.action == Action::Bandwidth) {
                Some(Expect::Shaped)
            } else {
                None
            }
        }
        Kind::TcpConnect => {
            if any(&mf, Action::drops_all) || any(&mr, Action::drops_all) {
                Some(Expect::Zero)
            } else if mf.is_empty() && mr.is_empty() {
                Some(Expect::Full)
            } else {
                None
            }
        }
        Kind::TcpBulk => {
            if any(&mf, |a| a.drops_all() || a == Action::Bandwidth) {
                Some(Expect::Shaped)
            } else if mf.is_empty() && mr.is_empty() {
                Some(Expect::Full)
            } else {
                None
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Probe {
    flow: Flow,
    kind: Kind,
    expect: Expect,
    /// The fault whose behaviour this probe checks (for counters and messages).
    fault: Option<String>,
    why: String,
}

impl Probe {
    fn key(&self) -> (Side, Proto, std::net::SocketAddr) {
        (self.flow.to(), self.flow.proto, self.flow.dst())
    }
}

/// Runs one probe; Ok(description) when the outcome is as expected.
fn run_probe(net: &Net, p: &Probe) -> Result<String, String> {
    let f = &p.flow;
    match (p.kind, p.expect) {
        (Kind::UdpCount, Expect::Partial) => {
            let got = udp_count(net, f, UDP_LOSS_N, 16, Duration::from_millis(300), false);
            let d = format!("{got} of {UDP_LOSS_N} datagrams arrived");
            let (lo, hi) = (UDP_LOSS_N * 15 / 100, UDP_LOSS_N * 75 / 100);
            if (lo..=hi).contains(&got) { Ok(d) } else { Err(d) }
        }
        (Kind::UdpCount, e) => {
            let full = e == Expect::Full;
            let got = udp_count(net, f, UDP_N, 16, Duration::from_millis(250), full);
            let d = format!("{got} of {UDP_N} datagrams arrived");
            if (full && got == UDP_N) || (!full && got == 0) { Ok(d) } else { Err(d) }
        }
        (Kind::UdpBulk, e) => {
            let full = e == Expect::Full;
            let got = udp_count(net, f, BULK_N, BULK_SIZE, Duration::from_millis(700), full);
            let d = format!("{got} of {BULK_N} datagrams of {BULK_SIZE} bytes arrived");
            let ok = match e {
                Expect::Full => got == BULK_N,
                Expect::Zero => got == 0,
                _ => got <= BULK_N / 4,
            };
            if ok { Ok(d) } else { Err(d) }
        }
        (Kind::TcpConnect, Expect::Full) => {
            if tcp_connects(net, f, Duration::from_secs(2)) {
                Ok("connected".into())
            } else {
                Err("did not connect within 2 s".into())
            }
        }
        (Kind::TcpConnect, _) => {
            let n = (0..2).filter(|_| tcp_connects(net, f, Duration::from_millis(300))).count();
            let d = format!("{n} of 2 connects (300 ms each) succeeded");
            if n == 0 { Ok(d) } else { Err(d) }
        }
        (Kind::TcpBulk, e) => {
            let full = e == Expect::Full;
            let window = if full { Duration::from_secs(2) } else { Duration::from_millis(900) };
            let t = Instant::now();
            let got = tcp_bulk(net, f, TCP_BULK, window);
            let d = format!("{got} of {TCP_BULK} bytes arrived in {:.2} s", t.elapsed().as_secs_f64());
            let ok = if full { got == TCP_BULK } else { got <= TCP_BULK / 4 };
            if ok { Ok(d) } else { Err(d) }
        }
    }
}

// ------------------------------------------------------------------- soak

struct Soak {
    // Dropped first: the daemons (killed), then the namespaces, then the
    // directory holding sockets, journals and logs.
    d2: Option<SoakDaemon>,
    d1: SoakDaemon,
    net: Net,
    tmp: tempfile::TempDir,

    seed: u64,
    rng: StdRng,
    started: Instant,
    step: usize,
    step_kind: String,
    history: VecDeque<String>,
    grace: Duration,
    faults: Vec<Fault>,
    /// Ended since the last oracle: their traffic must pass now.
    ended: Vec<Fault>,
    next_port: u16,
    second_runs: u32,
    skip: HashSet<String>,
    checks: BTreeMap<&'static str, u64>,
    steps_taken: BTreeMap<String, u32>,
    notes: Vec<String>,
    /// chaosd daemons this test did not start, with when they were first seen (s).
    foreign_seen: BTreeMap<String, f64>,
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

impl Soak {
    fn fail(&self, what: impl AsRef<str>) -> ! {
        let mut m = String::new();
        let _ = writeln!(m, "\n===== chaosd soak FAILED (seed {}) =====", self.seed);
        let _ = writeln!(
            m,
            "step {} ({}) at {:.1} s: {}",
            self.step,
            self.step_kind,
            self.started.elapsed().as_secs_f64(),
            what.as_ref()
        );
        let _ = writeln!(
            m,
            "replay: CHAOSD_SOAK_SEED={} cargo test --release -p chaosd --test soak -- --nocapture",
            self.seed
        );
        let _ = writeln!(m, "last steps:");
        for h in &self.history {
            let _ = writeln!(m, "  {h}");
        }
        let _ = writeln!(m, "faults the test expects active:");
        for f in &self.faults {
            let _ = writeln!(m, "  {}", f.summary());
        }
        let mut foreign = self.foreign_seen.clone();
        for d in foreign_daemons(&self.my_pids()) {
            foreign.entry(d).or_insert(self.started.elapsed().as_secs_f64());
        }
        if !foreign.is_empty() {
            let _ = writeln!(
                m,
                "NOTE: other chaosd daemons ran on this host during the soak (their start-up sweeps touch every \
                 namespace, so they may have caused this): {foreign:?}"
            );
        }
        let _ = writeln!(m, "main daemon log (last 40 lines, {}):\n{}", self.d1.log.display(), self.d1.log_tail(40));
        if let Some(d2) = &self.d2 {
            let _ = writeln!(m, "second daemon log (last 20 lines):\n{}", d2.log_tail(20));
        }
        let _ = writeln!(m, "===== end of failure (seed {}) =====", self.seed);
        panic!("{m}");
    }

    fn my_pids(&self) -> Vec<u32> {
        [self.d1.pid(), self.d2.as_ref().and_then(|d| d.pid())].into_iter().flatten().collect()
    }

    /// Notes chaosd daemons that this test did not start (for failure messages).
    fn watch_foreign(&mut self) {
        let t = self.started.elapsed().as_secs_f64();
        for d in foreign_daemons(&self.my_pids()) {
            self.foreign_seen.entry(d).or_insert(t);
        }
    }

    fn count(&mut self, what: &'static str) {
        *self.checks.entry(what).or_default() += 1;
    }

    fn log(&mut self, line: String) {
        println!("[{:6.1}s] #{} {line}", self.started.elapsed().as_secs_f64(), self.step);
        self.history.push_back(format!("#{} {line}", self.step));
        while self.history.len() > 12 {
            self.history.pop_front();
        }
    }

    fn daemon(&self, owner: usize) -> &SoakDaemon {
        if owner == 1 { &self.d1 } else { self.d2.as_ref().expect("second daemon running") }
    }

    fn ctl_json(&self, owner: usize, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.daemon(owner).ctl(&all);
        if !out.status.success() {
            self.fail(format!("chaosctl {all:?} (daemon #{owner}) failed: {}", text(&out.stderr).trim()));
        }
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| self.fail(format!("chaosctl {all:?}: not JSON ({e}): {}", text(&out.stdout))))
    }

    fn get(&self, owner: usize, id: &str) -> Value {
        self.ctl_json(owner, &["get", id])
    }

    /// `get id` must show an ended experiment in one of `states`, with a reason.
    fn expect_ended(&mut self, owner: usize, id: &str, states: &[&str], context: &str) {
        // An experiment the ticker is ending is "recovering" for a moment.
        let t = Instant::now();
        let mut e = self.get(owner, id);
        while e["state"] == "recovering" && t.elapsed() < Duration::from_secs(3) {
            thread::sleep(Duration::from_millis(50));
            e = self.get(owner, id);
        }
        let state = e["state"].as_str().unwrap_or("?");
        let reason = e["reason"].as_str().unwrap_or("");
        if !states.contains(&state) || reason.trim().is_empty() {
            self.fail(format!(
                "{context}: experiment {id}: expected state {states:?} with a reason, seen state {state:?} reason {reason:?}\n  {e}"
            ));
        }
        self.count("ended experiment's state and reason");
    }

    fn fresh_port(&mut self) -> u16 {
        let used: HashSet<u16> = self.faults.iter().chain(self.ended.iter()).map(|f| f.port).collect();
        loop {
            let p = self.next_port;
            self.next_port = if self.next_port >= 7999 { 7100 } else { self.next_port + 1 };
            if !used.contains(&p) {
                return p;
            }
        }
    }

    /// Whether the daemon refuses `f` as overlapping an active fault (its
    /// rule: same device, direction, protocol, peers and ports in the same
    /// role). It also refuses `--port P` beside `--dport Q` (P != Q) on the
    /// same device, direction and protocol (a packet P -> Q meets both),
    /// although `--port P` beside `--port Q` coexists. Such a fault is
    /// drawn again: refusals are not what this soak is about.
    fn overlaps_active(&self, f: &Fault) -> bool {
        self.faults.iter().any(|g| {
            g.owner == f.owner
                && g.target == f.target
                && g.proto == f.proto
                && (g.dir.egress() && f.dir.egress() || g.dir.ingress() && f.dir.ingress())
                && (g.peers.is_empty() || f.peers.is_empty() || g.peers.iter().any(|p| f.peers.contains(p)))
                && (g.dport_only != f.dport_only || g.port == f.port)
        })
    }

    fn random_fault(&mut self, owner: usize) -> (Fault, Option<Duration>) {
        // Some faults share the port of an active one (other direction,
        // other protocol or other peers), so that faults meet on one device
        // and one port: directions through the IFB, shared HTB trees.
        if self.rng.random_bool(0.35) && !self.skip.contains("shared-port") {
            for _ in 0..5 {
                if let Some(d) = self.draw_shared(owner) {
                    return d;
                }
            }
        }
        let port = self.fresh_port();
        let mut drawn = self.draw_fault(owner, port);
        for _ in 0..50 {
            if !self.overlaps_active(&drawn.0) {
                break;
            }
            drawn = self.draw_fault(owner, port);
        }
        drawn
    }

    /// A fault on the port of an active fault that the daemon must accept
    /// beside it.
    fn draw_shared(&mut self, owner: usize) -> Option<(Fault, Option<Duration>)> {
        // Prefer ingress bandwidth faults: their packets go through an IFB.
        let weighted: Vec<(Fault, u32)> = self
            .faults
            .iter()
            .filter(|g| g.owner == owner && g.port >= 7100)
            .map(|g| (g.clone(), if g.action == Action::Bandwidth && g.dir.ingress() { 3 } else { 1 }))
            .collect();
        let g = weighted.choose_weighted(&mut self.rng, |(_, w)| *w).ok()?.0.clone();
        let (mut f, dur) = self.draw_fault(owner, g.port);
        f.target = g.target;
        match self.rng.random_range(0..3) {
            0 => {
                if g.dir == Dir::Both {
                    return None;
                }
                f.proto = g.proto;
                f.dport_only = g.dport_only;
                f.dir = if g.dir == Dir::Egress { Dir::Ingress } else { Dir::Egress };
            }
            1 => f.proto = if g.proto == Proto::Tcp { Proto::Udp } else { Proto::Tcp },
            _ => {
                if g.peers.len() != 1 {
                    return None;
                }
                f.proto = g.proto;
                f.dport_only = g.dport_only;
                f.dir = g.dir;
                f.peers = vec![if g.peers[0] == Fam::V4 { Fam::V6 } else { Fam::V4 }];
            }
        }
        if f.action == Action::Loss60 && f.proto == Proto::Tcp {
            f.action = Action::Loss100;
        }
        if self.overlaps_active(&f) {
            return None;
        }
        Some((f, dur))
    }

    fn draw_fault(&mut self, owner: usize, port: u16) -> (Fault, Option<Duration>) {
        let r = &mut self.rng;
        let target = if r.random_bool(0.65) { Side::A } else { Side::B };
        let proto = if r.random_bool(0.6) { Proto::Udp } else { Proto::Tcp };
        let mut action = *[
            Action::Partition,
            Action::Partition,
            Action::Loss100,
            Action::Loss60,
            Action::Bandwidth,
            Action::Bandwidth,
        ]
        .choose(r)
        .unwrap();
        if action == Action::Loss60 && proto == Proto::Tcp {
            // A TCP connect through 60% loss is not decidable quickly.
            action = Action::Loss100;
        }
        let dport_only = match proto {
            Proto::Udp => r.random_bool(0.3),
            Proto::Tcp => r.random_bool(0.6),
        };
        let mut dir = *[Dir::Egress, Dir::Ingress, Dir::Both].choose(r).unwrap();
        let peers = match r.random_range(0..10) {
            0..5 => vec![],
            5..7 => vec![Fam::V4],
            7..9 => vec![Fam::V6],
            _ => vec![Fam::V4, Fam::V6],
        };
        let device = r.random_bool(0.25) || self.skip.contains("default-devices");
        if dir == Dir::Both && action == Action::Bandwidth && self.skip.contains("bandwidth-both") {
            dir = if port.is_multiple_of(2) { Dir::Egress } else { Dir::Ingress };
        }
        let duration =
            if r.random_bool(0.4) { None } else { Some(Duration::from_millis(r.random_range(3000..25_000))) };
        let f = Fault {
            id: String::new(),
            owner,
            target,
            proto,
            port,
            dport_only,
            dir,
            peers,
            device,
            action,
            ends: None,
            either: false,
        };
        (f, duration)
    }

    // ------------------------------------------------------------ steps

    fn inject(&mut self, mut f: Fault, duration: Option<Duration>) {
        let args = f.args(&self.net, duration);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let t0 = Instant::now();
        let out = self.daemon(f.owner).ctl(&argv);
        let t1 = Instant::now();
        if !out.status.success() {
            self.fail(format!(
                "inject refused or failed (the test asks only for faults that the daemon's overlap rule accepts beside \
                 the active ones)\n  \
                 chaosctl {}\n  exit {}: {}",
                args.join(" "),
                out.status,
                text(&out.stderr).trim()
            ));
        }
        f.id = text(&out.stdout).trim().to_string();
        f.ends = duration.map(|d| (t0 + d, t1 + d));
        let dur = duration.map(|d| format!(" for {:.1}s", d.as_secs_f64())).unwrap_or_default();
        self.log(format!("inject {}{dur}", f.summary()));
        self.count("inject");
        self.faults.push(f);
    }

    fn recover_one(&mut self) {
        let mine: Vec<usize> = (0..self.faults.len()).filter(|&i| self.faults[i].owner == 1).collect();
        let Some(&i) = mine.choose(&mut self.rng) else { return };
        let f = self.faults[i].clone();
        let out = self.d1.ctl(&["recover", &f.id]);
        let now = Instant::now();
        if out.status.success() {
            self.log(format!("recover {}", f.summary()));
            self.faults.remove(i);
            self.expect_ended(1, &f.id, &["recovered"], "after `recover`");
        } else {
            let err = text(&out.stderr);
            if err.contains("already ended") && f.may_have_expired(now) {
                self.log(format!("recover {} -> already expired", f.summary()));
                self.faults.remove(i);
                self.expect_ended(1, &f.id, &["expired"], "recover raced with the duration");
            } else {
                self.fail(format!("`recover {}` failed for an active fault ({}): {}", f.id, f.summary(), err.trim()));
            }
        }
        self.ended.push(f);
    }

    fn recover_all(&mut self) {
        let out = self.d1.ctl(&["recover", "--all"]);
        if !out.status.success() {
            self.fail(format!("`recover --all` failed: {}", text(&out.stderr).trim()));
        }
        let now = Instant::now();
        let (mine, rest): (Vec<Fault>, Vec<Fault>) = self.faults.drain(..).partition(|f| f.owner == 1);
        self.faults = rest;
        self.log(format!("recover --all ({} active)", mine.len()));
        for f in mine {
            let states: &[&str] = if f.may_have_expired(now) { &["recovered", "expired"] } else { &["recovered"] };
            self.expect_ended(1, &f.id, states, "after `recover --all`");
            self.ended.push(f);
        }
    }

    /// Sleeps until the soonest duration has certainly ended; false when
    /// none ends within 12 s.
    fn wait_expiry(&mut self) -> bool {
        let now = Instant::now();
        let Some(f) = self
            .faults
            .iter()
            .filter(|f| f.owner == 1)
            .filter_map(|f| f.ends.map(|(_, hi)| (hi, f.clone())))
            .min_by_key(|(hi, _)| *hi)
            .map(|(_, f)| f)
        else {
            return false;
        };
        let until = f.ends.unwrap().1 + Duration::from_millis(1600);
        if until > now + Duration::from_secs(12) {
            return false;
        }
        self.log(format!(
            "wait {:.1}s for the expiry of {}",
            until.saturating_duration_since(now).as_secs_f64(),
            f.summary()
        ));
        thread::sleep(until.saturating_duration_since(now));
        true
    }

    /// Probes that each given fault's traffic passes (used while the dead
    /// man's switch must have stopped them).
    fn expect_switch_fired(&mut self, faults: &[Fault], context: &str) {
        let mut probes = Vec::new();
        for f in faults {
            for from in self.in_direction_senders(f) {
                let (fam, pfx) = self.inside_peers(f);
                let flow = Flow { from, proto: f.proto, port: f.port, fam, pfx };
                let kind = Kind::of(f.proto, f.action == Action::Bandwidth);
                // Only the second daemon's faults (if any) still act; ports are unique.
                probes.push(Probe {
                    flow,
                    kind,
                    expect: Expect::Full,
                    fault: Some(f.id.clone()),
                    why: format!("{context}: the dead man's switch must have stopped {}", f.summary()),
                });
            }
        }
        self.run_probes(probes);
    }

    fn kill_restart(&mut self, slow: bool) {
        let grace = self.grace;
        let affected: Vec<Fault> = self.faults.iter().filter(|f| f.owner == 1).cloned().collect();
        let t_kill = Instant::now();
        self.d1.kill9();
        if slow {
            let wait = grace + Duration::from_millis(1200);
            self.log(format!(
                "SIGKILL the daemon, wait {:.1}s (grace {:.1}s)",
                wait.as_secs_f64(),
                grace.as_secs_f64()
            ));
            thread::sleep(wait);
            let now = Instant::now();
            let sure: Vec<Fault> = affected.iter().filter(|f| !f.may_have_expired(now)).cloned().collect();
            self.expect_switch_fired(&sure, "daemon SIGKILLed longer than the grace period");
            self.count("dead man's switch after SIGKILL");
        }
        self.d1.spawn();
        let ready = self.d1.wait_ready(Duration::from_secs(30)).unwrap_or_else(|e| self.fail(e));
        let down = t_kill.elapsed();
        if slow {
            self.log(format!("restarted (down {:.1}s): every network fault must have ended", down.as_secs_f64()));
            let now = Instant::now();
            let ids: Vec<String> = affected.iter().map(|f| f.id.clone()).collect();
            self.faults.retain(|f| !ids.contains(&f.id));
            for f in affected {
                let states: &[&str] = if f.may_have_expired(now) { &["failed", "expired"] } else { &["failed"] };
                self.expect_ended(1, &f.id, states, "restarted after more than the grace period");
                self.ended.push(f);
            }
        } else {
            // The new daemon reads the heartbeat at most `down` after the
            // last one was written (<= 100 ms before the kill).
            let decided = down + Duration::from_millis(250) < grace;
            self.log(format!(
                "SIGKILL + restart (down {:.2}s, start {:.2}s, grace {:.1}s): {}",
                down.as_secs_f64(),
                ready.as_secs_f64(),
                grace.as_secs_f64(),
                if decided { "faults must resume" } else { "too slow to tell: list and kernel must agree" }
            ));
            if !decided {
                self.notes.push(format!(
                    "step {}: restart took {:.2}s, grace {:.1}s",
                    self.step,
                    down.as_secs_f64(),
                    grace.as_secs_f64()
                ));
                for f in self.faults.iter_mut().filter(|f| f.owner == 1) {
                    f.either = true;
                }
            }
        }
    }

    fn stop_cont(&mut self, long: bool) {
        let grace = self.grace;
        let affected: Vec<Fault> = self.faults.iter().filter(|f| f.owner == 1).cloned().collect();
        let pause = if long { grace + Duration::from_millis(1200) } else { grace.mul_f64(0.35) };
        self.log(format!(
            "SIGSTOP the daemon for {:.1}s (grace {:.1}s), then SIGCONT",
            pause.as_secs_f64(),
            grace.as_secs_f64()
        ));
        self.d1.sigstop();
        let t_stop = Instant::now();
        thread::sleep(pause);
        if long {
            let now = Instant::now();
            let sure: Vec<Fault> = affected.iter().filter(|f| !f.may_have_expired(now)).cloned().collect();
            // Probing takes a while: the daemon stays stopped meanwhile.
            let guard = ContGuard(self.d1.pid());
            self.expect_switch_fired(&sure, "daemon SIGSTOPped longer than the grace period");
            self.count("dead man's switch while SIGSTOPped");
            drop(guard);
        }
        self.d1.sigcont();
        let stopped = t_stop.elapsed();
        if !long {
            return;
        }
        // Those experiments are over: listed as ended within a couple of
        // seconds, never re-armed.
        let ids: Vec<String> = affected.iter().map(|f| f.id.clone()).collect();
        let t_cont = Instant::now();
        let mut still: Vec<String>;
        loop {
            let list = self.ctl_json(1, &["list"]);
            still = list
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|e| e["id"].as_str())
                        .filter(|id| ids.iter().any(|i| i == id))
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            if still.is_empty() || t_cont.elapsed() > Duration::from_millis(2500) {
                break;
            }
            thread::sleep(Duration::from_millis(200));
        }
        if !still.is_empty() {
            // Say whether the kernel re-armed them, too.
            let now = Instant::now();
            let mut detail = String::new();
            for f in affected.iter().filter(|f| still.contains(&f.id) && !f.may_have_expired(now)) {
                let from = self.in_direction_senders(f)[0];
                let (fam, pfx) = self.inside_peers(f);
                let flow = Flow { from, proto: f.proto, port: f.port, fam, pfx };
                let kind = Kind::of(f.proto, f.action == Action::Bandwidth);
                let probe = Probe { flow, kind, expect: Expect::Full, fault: None, why: String::new() };
                let seen = match run_probe(&self.net, &probe) {
                    Ok(d) => format!("traffic passes ({d})"),
                    Err(d) => format!("traffic is affected again: re-armed ({d})"),
                };
                let _ = write!(detail, "\n  {}: still listed {}; {}", f.summary(), self.get(1, &f.id)["state"], seen);
            }
            self.fail(format!(
                "daemon SIGSTOPped {:.1}s (> grace {:.1}s): the dead man's switch fired, but {:.1}s after SIGCONT \
                 `list` still shows {} of {} of those experiments active (expected: ended, failed with a reason, never re-armed){detail}",
                stopped.as_secs_f64(),
                grace.as_secs_f64(),
                t_cont.elapsed().as_secs_f64(),
                still.len(),
                ids.len()
            ));
        }
        let now = Instant::now();
        self.faults.retain(|f| !ids.contains(&f.id));
        for f in affected {
            let states: &[&str] = if f.may_have_expired(now) { &["failed", "expired"] } else { &["failed"] };
            self.expect_ended(1, &f.id, states, "after SIGSTOP longer than the grace period and SIGCONT");
            self.ended.push(f);
        }
        self.count("ended after SIGSTOP > grace");
    }

    fn second_daemon(&mut self) {
        let k = self.second_runs;
        self.second_runs += 1;
        let dir = self.tmp.path().join(format!("second-{k}"));
        let bpf = PathBuf::from(format!("/sys/fs/bpf/chaosd-soak-{}-2nd-{k}", std::process::id()));
        let mut d2 = SoakDaemon::new(
            "second daemon",
            dir.join("run/chaosd.sock"),
            dir.join("state"),
            bpf.clone(),
            self.tmp.path().join(format!("second-{k}.log")),
            self.grace,
        );
        d2.spawn();
        self.d2 = Some(d2);
        let ready = self.d2.as_mut().unwrap().wait_ready(Duration::from_secs(30));
        if let Err(e) = ready {
            self.fail(format!("a second daemon with its own socket, state dir and BPF dir did not start: {e}"));
        }
        self.log("second daemon started beside the first (own socket, state dir, BPF dir)".into());
        if self.rng.random_bool(0.6) {
            let (mut f, _) = self.random_fault(2);
            f.action = Action::Partition;
            f.proto = Proto::Udp;
            f.device = true;
            // Mostly on the device and direction where the first daemon has
            // a fault: both daemons' classifiers then sit on one hook.
            let firsts: Vec<Fault> = self.faults.iter().filter(|g| g.owner == 1).cloned().collect();
            if let Some(g) = firsts.choose(&mut self.rng).filter(|_| self.rng.random_bool(0.8)) {
                f.target = g.target;
                f.dir = g.dir;
            }
            self.inject(f, None);
        }
        // The first daemon's faults are untouched while the second runs.
        self.oracle("second daemon running");
        let mut d2 = self.d2.take().unwrap();
        match d2.term(Duration::from_secs(20)) {
            Ok(st) if st.success() => {}
            Ok(st) => {
                self.d2 = Some(d2);
                self.fail(format!("the second daemon exited with {st} on SIGTERM"));
            }
            Err(e) => {
                self.d2 = Some(d2);
                self.fail(e);
            }
        }
        let gone: Vec<Fault> = self.faults.iter().filter(|f| f.owner == 2).cloned().collect();
        self.faults.retain(|f| f.owner != 2);
        self.ended.extend(gone);
        if bpf.exists() {
            let left = std::fs::read_dir(&bpf)
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
                .unwrap_or_default();
            self.d2 = Some(d2);
            self.fail(format!("the second daemon's clean stop left its BPF dir {}: {left:?}", bpf.display()));
        }
        self.log("second daemon stopped (SIGTERM)".into());
        self.count("second daemon beside the first");
    }

    fn shared_daemon(&mut self, which: &str) {
        let k = self.second_runs;
        self.second_runs += 1;
        let dir = self.tmp.path().join(format!("shared-{k}"));
        let own_socket = dir.join("run/chaosd.sock");
        let socket = if which == "socket" { self.d1.socket.clone() } else { own_socket.clone() };
        let state = if which == "state" { self.d1.state_dir.clone() } else { dir.join("state") };
        let bpf = if which == "bpf" {
            self.d1.bpf_dir.clone()
        } else {
            PathBuf::from(format!("/sys/fs/bpf/chaosd-soak-{}-2nd-{k}", std::process::id()))
        };
        let shared = match which {
            "socket" => socket.clone(),
            "state" => state.clone(),
            _ => bpf.clone(),
        };
        let mut b = SoakDaemon::new(
            "sharing daemon",
            socket,
            state,
            bpf,
            self.tmp.path().join(format!("shared-{k}.log")),
            self.grace,
        );
        b.owns_bpf_dir = which != "bpf";
        self.log(format!(
            "start a second daemon sharing the first one's {which} ({}): it must refuse",
            shared.display()
        ));
        b.spawn();
        let start = Instant::now();
        let mut served = false;
        let status = loop {
            if let Some(st) = b.exited() {
                break Some(st);
            }
            if which != "socket"
                && std::os::unix::net::UnixStream::connect(&own_socket).is_ok()
                && b.ctl(&["status"]).status.success()
            {
                served = true;
                break None;
            }
            if start.elapsed() > Duration::from_secs(20) {
                break None;
            }
            thread::sleep(Duration::from_millis(50));
        };
        let log = b.log_text();
        match status {
            Some(st) if !st.success() => {
                let msg = log.lines().filter(|l| !l.starts_with("=====")).collect::<Vec<_>>().join("\n");
                if !msg.contains(&*shared.to_string_lossy()) {
                    self.fail(format!(
                        "a second daemon sharing the first one's {which} refused ({st}), but its message does not name {}:\n{msg}",
                        shared.display()
                    ));
                }
                self.log(format!(
                    "refused in {:.1}s: {}",
                    start.elapsed().as_secs_f64(),
                    msg.lines().last().unwrap_or("").trim()
                ));
            }
            other => {
                // Kill it hard: a clean stop of a daemon on the first one's
                // BPF dir would remove that dir.
                b.kill9();
                let what = match other {
                    Some(st) => format!("exited with {st} instead of refusing"),
                    None if served => "started and served its API instead of refusing".into(),
                    None => "neither refused nor answered within 20 s".into(),
                };
                self.fail(format!(
                    "a second daemon sharing the first one's {which} ({}) {what}; its log:\n{}",
                    shared.display(),
                    log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
        }
        self.count("second daemon sharing a dir refused");
    }

    // ----------------------------------------------------------- oracle

    /// The sides that send traffic in the fault's direction(s).
    fn in_direction_senders(&self, f: &Fault) -> Vec<Side> {
        let mut v = Vec::new();
        if f.dir.egress() {
            v.push(f.target);
        }
        if f.dir.ingress() {
            v.push(f.target.other());
        }
        v
    }

    /// An address pair the fault selects (inside its peers), chosen at random.
    fn inside_peers(&self, f: &Fault) -> (Fam, Pfx) {
        // Deterministic per fault so that replays match: derived from the port.
        if f.peers.is_empty() {
            let fam = if f.port.is_multiple_of(2) { Fam::V4 } else { Fam::V6 };
            let pfx = if (f.port / 2).is_multiple_of(2) { Pfx::Primary } else { Pfx::Secondary };
            (fam, pfx)
        } else {
            (f.peers[f.port as usize % f.peers.len()], Pfx::Primary)
        }
    }

    fn plan_probes(&mut self, now: Instant) -> Vec<Probe> {
        let mut out: Vec<Probe> = Vec::new();
        let faults = self.faults.clone();
        let push = |out: &mut Vec<Probe>, flow: Flow, kind: Kind, fault: Option<&Fault>, why: String| {
            if let Some(expect) = predict(&flow, kind, &faults, now) {
                out.push(Probe { flow, kind, expect, fault: fault.map(|f| f.id.clone()), why });
            }
        };
        for f in faults.iter().filter(|f| f.certain_until(now, Duration::from_secs(4))) {
            let bw = f.action == Action::Bandwidth;
            let kind = Kind::of(f.proto, bw);
            let (fam, pfx) = self.inside_peers(f);
            // In the fault's direction(s): it acts.
            for from in self.in_direction_senders(f) {
                let flow = Flow { from, proto: f.proto, port: f.port, fam, pfx };
                push(&mut out, flow, kind, Some(f), format!("selected by {}", f.summary()));
            }
            // The other direction: untouched (for TCP --port, both directions carry the port: not decidable).
            if f.dir != Dir::Both {
                let from = if f.dir == Dir::Egress { f.target.other() } else { f.target };
                let flow = Flow { from, proto: f.proto, port: f.port, fam, pfx };
                push(&mut out, flow, kind, Some(f), format!("opposite direction of {}", f.summary()));
            }
            // Outside the peers: untouched.
            if !f.peers.is_empty() {
                let outside: Vec<(Fam, Pfx)> = [Fam::V4, Fam::V6]
                    .into_iter()
                    .flat_map(|fam| [(fam, Pfx::Primary), (fam, Pfx::Secondary)])
                    .filter(|(fam, pfx)| !(*pfx == Pfx::Primary && f.peers.contains(fam)))
                    .collect();
                let &(ofam, opfx) = outside.choose(&mut self.rng).unwrap();
                let &from = self.in_direction_senders(f).choose(&mut self.rng).unwrap();
                let flow = Flow { from, proto: f.proto, port: f.port, fam: ofam, pfx: opfx };
                push(&mut out, flow, kind, Some(f), format!("outside the peers of {}", f.summary()));
            }
            // The other protocol on the same port: untouched.
            let other = if f.proto == Proto::Tcp { Proto::Udp } else { Proto::Tcp };
            let &from = self.in_direction_senders(f).choose(&mut self.rng).unwrap();
            let flow = Flow { from, proto: other, port: f.port, fam, pfx };
            push(&mut out, flow, Kind::of(other, bw), Some(f), format!("other protocol than {}", f.summary()));
        }
        // Faults that ended since the last oracle: their traffic passes again.
        for f in self.ended.clone() {
            let (fam, pfx) = self.inside_peers(&f);
            for from in self.in_direction_senders(&f) {
                let flow = Flow { from, proto: f.proto, port: f.port, fam, pfx };
                let kind = Kind::of(f.proto, f.action == Action::Bandwidth);
                push(&mut out, flow, kind, None, format!("ended: {}", f.summary()));
            }
        }
        // A port no fault selects: passes both ways, both protocols.
        let used: HashSet<u16> = self.faults.iter().map(|f| f.port).collect();
        let port = loop {
            let p = self.rng.random_range(7000..7100);
            if !used.contains(&p) {
                break p;
            }
        };
        for from in [Side::A, Side::B] {
            for proto in [Proto::Udp, Proto::Tcp] {
                let fam = if self.rng.random_bool(0.5) { Fam::V4 } else { Fam::V6 };
                let pfx = if self.rng.random_bool(0.5) { Pfx::Primary } else { Pfx::Secondary };
                let flow = Flow { from, proto, port, fam, pfx };
                push(&mut out, flow, Kind::of(proto, false), None, "a port no fault selects".into());
            }
        }
        out
    }

    /// Runs probes, several at a time (no two on the same receiving socket).
    /// Returns each probe with the number of times it ran.
    fn run_probes(&mut self, probes: Vec<Probe>) -> Vec<(Probe, u64)> {
        let mut executed = Vec::new();
        let mut pending = probes;
        while !pending.is_empty() {
            let mut batch = Vec::new();
            let mut keys = HashSet::new();
            let mut rest = Vec::new();
            for p in pending {
                if batch.len() < 8 && keys.insert(p.key()) {
                    batch.push(p);
                } else {
                    rest.push(p);
                }
            }
            pending = rest;
            let net = &self.net;
            let results: Vec<(Probe, Result<String, String>)> = thread::scope(|s| {
                let hs: Vec<_> = batch
                    .into_iter()
                    .map(|p| {
                        s.spawn(move || {
                            let r = run_probe(net, &p);
                            (p, r)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().expect("probe thread panicked")).collect()
            });
            for (p, r) in results {
                let mut attempts = 1;
                let r = match r {
                    // Passing and partial outcomes get one more try (a loaded
                    // 2-core machine); an effect that should not be there does not.
                    Err(first) if matches!(p.expect, Expect::Full | Expect::Partial) => {
                        attempts += 1;
                        match run_probe(&self.net, &p) {
                            Ok(d) => {
                                self.notes.push(format!(
                                    "step {}: {} passed on retry (first: {first})",
                                    self.step,
                                    p.flow.describe()
                                ));
                                Ok(d)
                            }
                            Err(second) => Err(format!("{first}; retry: {second}")),
                        }
                    }
                    r => r,
                };
                self.count(match p.expect {
                    Expect::Full => "probe: traffic passes",
                    Expect::Zero => "probe: traffic dropped",
                    Expect::Partial => "probe: 60% loss",
                    Expect::Shaped => "probe: 8kbit",
                });
                if let Err(seen) = r {
                    self.probe_failed(&p, &seen);
                }
                executed.push((p, attempts));
            }
        }
        executed
    }

    fn probe_failed(&self, p: &Probe, seen: &str) -> ! {
        let mut m = format!(
            "traffic differs from what `list` says\n  probe: {} ({:?})\n  because: {}\n  expected: {}\n  seen: {seen}",
            p.flow.describe(),
            p.kind,
            p.why,
            p.expect.text()
        );
        if let Some(f) = p.fault.as_ref().and_then(|id| self.faults.iter().find(|f| &f.id == id)) {
            let _ = write!(m, "\n  daemon #{} says: {}", f.owner, self.get(f.owner, &f.id));
        }
        for side in [Side::A, Side::B] {
            let ns = self.net.ns(side);
            let state = sh(&format!(
                "tc -n {ns} qdisc show; tc -n {ns} class show dev {dev}; tc -n {ns} filter show dev {dev} ingress; ip -n {ns} -o link | cut -d' ' -f2",
                dev = Net::dev(side)
            ))
            .unwrap_or_else(|e| e);
            let _ = write!(m, "\n  kernel in {ns} ({side:?}):\n    {}", state.trim().replace('\n', "\n    "));
            let _ = write!(m, "\n    {:?}", marked(ns));
        }
        self.fail(m)
    }

    /// `list` of daemon `owner` compared with the model; returns the
    /// listed experiments by id. Resolves faults whose fate after a restart
    /// was undecided.
    fn check_list(&mut self, owner: usize, now: Instant) -> BTreeMap<String, Value> {
        let list = self.ctl_json(owner, &["list"]);
        let listed: BTreeMap<String, Value> = list
            .as_array()
            .unwrap_or_else(|| self.fail(format!("`list` is not an array: {list}")))
            .iter()
            .map(|e| (e["id"].as_str().unwrap_or("").to_string(), e.clone()))
            .collect();
        for (id, e) in &listed {
            let Some(f) = self.faults.iter().find(|f| &f.id == id && f.owner == owner) else {
                self.fail(format!(
                    "daemon #{owner} lists an experiment the test did not ask it for (or that already ended): {e}"
                ));
            };
            if e["state"] != "active" {
                self.fail(format!("daemon #{owner} lists {} as {}, expected active: {e}", f.summary(), e["state"]));
            }
            if e["fault_name"] != f.action.name() {
                self.fail(format!("daemon #{owner} lists {} as a {} fault: {e}", f.summary(), e["fault_name"]));
            }
        }
        let mut resolved = Vec::new();
        for f in self.faults.iter().filter(|f| f.owner == owner) {
            let is_listed = listed.contains_key(&f.id);
            if f.either {
                resolved.push((f.id.clone(), is_listed));
            } else if !is_listed && !f.may_have_expired(now) {
                let e = self.get(owner, &f.id);
                self.fail(format!(
                    "daemon #{owner} no longer lists {} although nothing ended it (no recover, duration not over, \
                     no stop beyond the grace period)\n  get: {e}",
                    f.summary()
                ));
            }
        }
        for (id, is_listed) in resolved {
            if is_listed {
                self.faults.iter_mut().find(|f| f.id == id).unwrap().either = false;
            } else {
                let f = self.faults.iter().find(|f| f.id == id).unwrap().clone();
                self.faults.retain(|x| x.id != id);
                self.log(format!("not resumed after the slow restart: {}", f.summary()));
                self.expect_ended(
                    owner,
                    &f.id,
                    &["failed", "expired"],
                    "not resumed after a restart near the grace period",
                );
                self.ended.push(f);
            }
        }
        self.count("list matches the model");
        listed
    }

    /// Nothing chaosd-marked without an active experiment that needs it.
    fn check_kernel(&mut self) {
        for side in [Side::A, Side::B] {
            let ns = self.net.ns(side).to_string();
            let here: Vec<&Fault> = self.faults.iter().filter(|f| f.target == side).collect();
            let bw = here.iter().any(|f| f.action == Action::Bandwidth);
            let in_bw = here.iter().any(|f| f.action == Action::Bandwidth && f.dir.ingress());
            let m = marked(&ns);
            let mut wrong = Vec::new();
            // A classifier per direction that some active fault acts in
            // (filters and TCX programs are listed as "DEV DIR: ...").
            for (dir, egress) in [("egress", true), ("ingress", false)] {
                if here.iter().any(|f| if egress { f.dir.egress() } else { f.dir.ingress() }) {
                    continue;
                }
                let tag = format!(" {dir}: ");
                let left: Vec<&String> = m.filters.iter().chain(m.tcx.iter()).filter(|l| l.contains(&tag)).collect();
                if !left.is_empty() {
                    wrong.push(format!("{dir} classifiers with no active fault acting on {dir} in {ns}: {left:?}"));
                }
            }
            let sel: Vec<&String> = m.filters.iter().filter(|l| l.contains("ifb_sel")).collect();
            if !in_bw && !sel.is_empty() {
                wrong.push(format!("IFB redirect filter with no active ingress bandwidth fault in {ns}: {sel:?}"));
            }
            if !bw && !m.htb_roots.is_empty() {
                wrong.push(format!("HTB root c4a0: with no active bandwidth fault in {ns}: {:?}", m.htb_roots));
            }
            if !in_bw && !m.ifbs.is_empty() {
                wrong.push(format!("IFB device(s) with no active ingress bandwidth fault in {ns}: {:?}", m.ifbs));
            }
            if !wrong.is_empty() {
                let active: Vec<String> = here.iter().map(|f| f.summary()).collect();
                self.fail(format!(
                    "chaosd-marked objects without an active experiment that needs them:\n  {}\n  active faults on {side:?}: {active:?}",
                    wrong.join("\n  ")
                ));
            }
            self.count("kernel objects match active faults");
        }
        // The maps of each running daemon: one rule per active experiment,
        // no device entry or pinned program copy for a namespace without one.
        let now = Instant::now();
        for owner in [1, 2] {
            let d = self.daemon_opt(owner);
            let Some(d) = d else { continue };
            let p = pinned(&d.bpf_dir).unwrap_or_else(|e| self.fail(e));
            let mine: Vec<&Fault> = self.faults.iter().filter(|f| f.owner == owner).collect();
            let certain = mine.iter().filter(|f| !f.may_have_expired(now)).count();
            if p.rules.len() < certain || p.rules.len() > mine.len() {
                self.fail(format!(
                    "daemon #{owner}'s pinned rule map holds {} active rules {:?}; expected {}..={} (the active experiments)",
                    p.rules.len(),
                    p.rules,
                    certain,
                    mine.len()
                ));
            }
            for side in [Side::A, Side::B] {
                if mine.iter().any(|f| f.target == side) {
                    continue;
                }
                let Some(ino) = self.net.inode(side) else { continue };
                let devs: Vec<_> = p.devices.iter().filter(|(n, _, _)| *n as u64 == ino).collect();
                let pins: Vec<_> = p.ns_dirs.iter().filter(|n| **n == format!("ns-{ino}")).collect();
                if !devs.is_empty() || !pins.is_empty() {
                    self.fail(format!(
                        "daemon #{owner} has no active fault on {side:?} but its pinned maps/dir still hold it: \
                         device entries {devs:?}, pins {pins:?}"
                    ));
                }
            }
            self.count("pinned maps match active faults");
        }
    }

    fn daemon_opt(&self, owner: usize) -> Option<&SoakDaemon> {
        if owner == 1 { Some(&self.d1) } else { self.d2.as_ref() }
    }

    /// (matched, dropped, delayed) by id.
    fn counters(listed: &BTreeMap<String, Value>) -> BTreeMap<String, [u64; 3]> {
        listed
            .iter()
            .map(|(id, e)| {
                let c = &e["counters"];
                let v = |k: &str| c[k].as_u64().unwrap_or(0);
                (id.clone(), [v("packets_matched"), v("packets_dropped"), v("packets_delayed")])
            })
            .collect()
    }

    /// The counters `list` shows grew by what the probes sent through each
    /// fault: exactly, for UDP faults (every datagram a UDP fault selects
    /// is matched once, at one hook); at least one drop per blocked
    /// connect for TCP faults.
    fn check_counters(
        &mut self,
        executed: &[(Probe, u64)],
        before: &BTreeMap<String, [u64; 3]>,
        after: &BTreeMap<String, [u64; 3]>,
        planned_at: Instant,
    ) {
        let faults: Vec<Fault> =
            self.faults.iter().filter(|f| f.certain_until(planned_at, Duration::from_secs(4))).cloned().collect();
        for f in faults {
            let (Some(b), Some(a)) = (before.get(&f.id), after.get(&f.id)) else { continue };
            let grew = [a[0].saturating_sub(b[0]), a[1].saturating_sub(b[1]), a[2].saturating_sub(b[2])];
            let mut want = 0u64;
            let mut blocked_connects = 0u64;
            let mut through = Vec::new();
            for (p, attempts) in executed {
                let fl = &p.flow;
                let fwd = Pkt { src: fl.from, proto: fl.proto, sport: 0, dport: fl.port, fam: fl.fam, pfx: fl.pfx };
                let rev = Pkt { src: fl.to(), proto: fl.proto, sport: fl.port, dport: 0, fam: fl.fam, pfx: fl.pfx };
                if fl.proto == Proto::Udp && f.selects(&fwd) {
                    let n = match (p.kind, p.expect) {
                        (Kind::UdpCount, Expect::Partial) => UDP_LOSS_N,
                        (Kind::UdpCount, _) => UDP_N,
                        _ => BULK_N,
                    } as u64;
                    want += n * attempts;
                    through.push(format!("{} x{attempts} ({n} datagrams)", fl.describe()));
                }
                if fl.proto == Proto::Tcp
                    && p.kind == Kind::TcpConnect
                    && p.expect == Expect::Zero
                    && (f.selects(&fwd) || f.selects(&rev))
                {
                    blocked_connects += 2 * attempts;
                }
            }
            let wrong = if f.proto == Proto::Udp {
                let dropped_ok = match f.action {
                    Action::Partition | Action::Loss100 => grew[1] == want,
                    Action::Loss60 => grew[1] <= want,
                    Action::Bandwidth => grew[1] == 0,
                };
                let delayed_ok = if f.action == Action::Bandwidth { grew[2] == want } else { grew[2] == 0 };
                grew[0] != want || !dropped_ok || !delayed_ok
            } else {
                // Retransmissions make TCP counts inexact: at least one drop.
                f.action.drops_all() && blocked_connects > 0 && grew[1] == 0
            };
            if wrong {
                self.fail(format!(
                    "counters of {}: the probes sent {want} datagrams it selects (and {blocked_connects} blocked connects);                      `list` counters grew by matched +{}, dropped +{}, delayed +{}\n  probes it selects: {through:?}",
                    f.summary(),
                    grew[0],
                    grew[1],
                    grew[2]
                ));
            }
            self.count("counters follow the probes");
        }
    }

    fn oracle(&mut self, label: &str) {
        self.watch_foreign();
        for owner in [1, 2] {
            let Some(d) = (if owner == 1 { Some(&mut self.d1) } else { self.d2.as_mut() }) else { continue };
            if let Some(st) = d.exited() {
                self.fail(format!("daemon #{owner} exited unexpectedly ({st})"));
            }
        }
        // Durations that are certainly over: `get` says expired.
        let now = Instant::now();
        let done: Vec<Fault> = self.faults.iter().filter(|f| !f.either && f.certainly_expired(now)).cloned().collect();
        for f in done {
            self.faults.retain(|x| x.id != f.id);
            self.log(format!("expired: {}", f.summary()));
            self.expect_ended(f.owner, &f.id, &["expired"], "duration over");
            self.ended.push(f);
        }
        let owners: Vec<usize> = if self.d2.is_some() { vec![1, 2] } else { vec![1] };
        let mut before = BTreeMap::new();
        for &o in &owners {
            before.extend(Self::counters(&self.check_list(o, Instant::now())));
        }
        let now = Instant::now();
        let probes = self.plan_probes(now);
        let n = probes.len();
        let executed = self.run_probes(probes);
        let mut after = BTreeMap::new();
        for &o in &owners {
            after.extend(Self::counters(&self.check_list(o, Instant::now())));
        }
        self.check_counters(&executed, &before, &after, now);
        self.watch_foreign();
        self.check_kernel();
        self.ended.clear();
        let active = self.faults.len();
        self.log(format!("oracle ({label}): {active} active, {n} probes ok"));
    }

    // ------------------------------------------------------------- run

    fn pick_step(&mut self, skip: &HashSet<String>) -> &'static str {
        const KINDS: &[(&str, u32)] = &[
            ("inject", 30),
            ("recover", 10),
            ("recover-all", 3),
            ("expiry", 7),
            ("kill-quick", 6),
            ("kill-slow", 4),
            ("stop-short", 5),
            ("stop-long", 5),
            ("second", 5),
            ("shared-socket", 2),
            ("shared-state", 2),
            ("shared-bpf", 2),
        ];
        if self.step <= 3 {
            return "inject";
        }
        let total: u32 = KINDS.iter().filter(|(k, _)| !skip.contains(*k)).map(|(_, w)| w).sum();
        let mut x = self.rng.random_range(0..total.max(1));
        for (k, w) in KINDS.iter().filter(|(k, _)| !skip.contains(*k)) {
            if x < *w {
                return k;
            }
            x -= w;
        }
        "inject"
    }

    fn take_step(&mut self, kind: &'static str) {
        let active1 = self.faults.iter().filter(|f| f.owner == 1).count();
        let kind = match kind {
            "inject" if active1 >= MAX_ACTIVE => "recover",
            "recover" | "recover-all" if active1 == 0 => "inject",
            k => k,
        };
        self.step_kind = kind.to_string();
        *self.steps_taken.entry(kind.to_string()).or_default() += 1;
        match kind {
            "inject" => {
                let (f, d) = self.random_fault(1);
                self.inject(f, d);
            }
            "recover" => self.recover_one(),
            "recover-all" => self.recover_all(),
            "expiry" => {
                if !self.wait_expiry() {
                    self.step_kind = "inject (no expiry due)".into();
                    let (f, _) = self.random_fault(1);
                    let d = Duration::from_millis(self.rng.random_range(2500..5000));
                    self.inject(f, Some(d));
                }
            }
            "kill-quick" => self.kill_restart(false),
            "kill-slow" => self.kill_restart(true),
            "stop-short" => self.stop_cont(false),
            "stop-long" => self.stop_cont(true),
            "second" => self.second_daemon(),
            "shared-socket" => self.shared_daemon("socket"),
            "shared-state" => self.shared_daemon("state"),
            "shared-bpf" => self.shared_daemon("bpf"),
            other => unreachable!("{other}"),
        }
    }
}

/// Sends SIGCONT on drop, so that a failure while the daemon is stopped
/// does not leave it stopped (the daemon guard kills it afterwards).
struct ContGuard(Option<u32>);

impl Drop for ContGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGCONT);
        }
    }
}

#[test]
fn soak_random_faults_restarts_and_neighbours_keep_list_and_kernel_in_agreement() {
    let seed = env_u64("CHAOSD_SOAK_SEED").unwrap_or_else(rand::random);
    let secs = env_u64("CHAOSD_SOAK_SECS").unwrap_or(100);
    let grace = Duration::from_millis(env_u64("CHAOSD_SOAK_GRACE_MS").unwrap_or(3000));
    let skip: HashSet<String> = std::env::var("CHAOSD_SOAK_SKIP")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    println!(
        "chaosd soak: CHAOSD_SOAK_SEED={seed} CHAOSD_SOAK_SECS={secs} CHAOSD_SOAK_GRACE_MS={} CHAOSD_SOAK_SKIP={:?}",
        grace.as_millis(),
        skip
    );
    eprintln!("chaosd soak: CHAOSD_SOAK_SEED={seed}");
    assert!(
        nix::unistd::geteuid().is_root(),
        "the soak needs root (namespaces, BPF, tc); seed {seed}: run it as CI does, as root"
    );

    let tmp = tempfile::tempdir().expect("temp dir");
    let net = Net::new().unwrap_or_else(|e| panic!("seed {seed}: building the test topology: {e}"));
    let mut d1 = SoakDaemon::new(
        "main daemon",
        tmp.path().join("run/chaosd.sock"),
        tmp.path().join("state"),
        PathBuf::from(format!("/sys/fs/bpf/chaosd-soak-{}-main", std::process::id())),
        tmp.path().join("main.log"),
        grace,
    );
    d1.spawn();
    let mut soak = Soak {
        d2: None,
        d1,
        net,
        tmp,
        seed,
        rng: StdRng::seed_from_u64(seed),
        started: Instant::now(),
        step: 0,
        step_kind: "start".into(),
        history: VecDeque::new(),
        grace,
        faults: Vec::new(),
        ended: Vec::new(),
        next_port: 7100,
        second_runs: 0,
        skip: skip.clone(),
        checks: BTreeMap::new(),
        steps_taken: BTreeMap::new(),
        notes: Vec::new(),
        foreign_seen: BTreeMap::new(),
    };
    if let Err(e) = soak.d1.wait_ready(Duration::from_secs(30)) {
        soak.fail(e);
    }
    soak.oracle("start");

    let budget = Duration::from_secs(secs);
    while soak.started.elapsed() < budget {
        soak.step += 1;
        let kind = soak.pick_step(&skip);
        soak.take_step(kind);
        soak.oracle("after step");
    }

    // The end: recover everything, check the kernel is clean, stop cleanly.
    soak.step += 1;
    soak.step_kind = "final recover --all and clean stop".into();
    if soak.faults.iter().any(|f| f.owner == 1) {
        soak.recover_all();
    }
    soak.oracle("final");
    match soak.d1.term(Duration::from_secs(20)) {
        Ok(st) if st.success() => {}
        Ok(st) => soak.fail(format!("the main daemon exited with {st} on SIGTERM")),
        Err(e) => soak.fail(e),
    }
    for side in [Side::A, Side::B] {
        let m = marked(soak.net.ns(side));
        if !m.is_empty() {
            soak.fail(format!(
                "after the final clean stop, chaosd-marked objects remain in {}: {m:?}",
                soak.net.ns(side)
            ));
        }
    }
    if soak.d1.bpf_dir.exists() {
        soak.fail(format!("the clean stop left the BPF dir {}", soak.d1.bpf_dir.display()));
    }

    println!("chaosd soak passed: seed {seed}, {} steps in {:.1} s", soak.step, soak.started.elapsed().as_secs_f64());
    println!("  steps: {:?}", soak.steps_taken);
    println!("  checks: {:?}", soak.checks);
    for n in &soak.notes {
        println!("  note: {n}");
    }
    for (d, t) in &soak.foreign_seen {
        println!("  note: another chaosd ran beside the soak (first seen at {t:.1} s): {d}");
    }
}
