//! Shared helpers for the privileged network tests: a two-namespace veth
//! topology removed by a guard (also on panic), a driver on its own bpffs
//! directory with a heartbeat thread, a recorder that collects objects,
//! snapshots of what `tc` and `ip` show, and traffic helpers whose sockets
//! are opened inside the namespaces.
#![allow(dead_code, reason = "each test file uses a different subset")]

use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, SystemTime},
};

use chaosd::{
    driver::{ApplyContext, Driver, Recorder},
    error::ApiError,
    experiment::Experiment,
    net::{NetConfig, NetworkDriver},
    netns::NetnsRef,
    spec::{Direction, Fault, NetAction, NetworkFault, PortRange, Protocol, Selector, Target},
};
use serde_json::Value;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Panics with a reason when the test cannot run here.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this privileged test needs root (netns, BPF, tc): run it with sudo");
    }
}

pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("run sh");
    if !out.status.success() {
        panic!("`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces `a` and `b` joined by veth `va` <-> `vb`:
/// a = 10.77.N.1/24, 10.78.N.1/24, fd77:N::1/64; b = .2 / ::2.
pub struct Topo {
    pub a: String,
    pub b: String,
    pub n: u32,
}

impl Topo {
    pub fn new() -> Self {
        require_root();
        let n = SEQ.fetch_add(1, Ordering::SeqCst) + 1;
        let tag = format!("{}-{n}", std::process::id());
        let t = Topo { a: format!("chaosd-t-{tag}-a"), b: format!("chaosd-t-{tag}-b"), n };
        let (a, b) = (&t.a, &t.b);
        sh(&format!(
            "ip netns add {a} && ip netns add {b} && \
             ip -n {a} link add va type veth peer name vb netns {b} && \
             ip -n {a} link set lo up && ip -n {b} link set lo up && \
             ip -n {a} addr add 10.77.{n}.1/24 dev va && ip -n {b} addr add 10.77.{n}.2/24 dev vb && \
             ip -n {a} addr add 10.78.{n}.1/24 dev va && ip -n {b} addr add 10.78.{n}.2/24 dev vb && \
             ip -n {a} addr add fd77:{n}::1/64 dev va nodad && ip -n {b} addr add fd77:{n}::2/64 dev vb nodad && \
             ip -n {a} link set va up && ip -n {b} link set vb up"
        ));
        // Wait until both families answer (link carrier, IPv6 neighbours).
        for ip in [t.ip_b(false), t.ip_b(true)] {
            let ok = (0..10).any(|_| udp_passes(a, b, SocketAddr::new(ip, 9)));
            assert!(ok, "{ip} not reachable from {a} in the test topology");
        }
        t
    }

    pub fn ip_a(&self, v6: bool) -> IpAddr {
        if v6 { format!("fd77:{}::1", self.n).parse().unwrap() } else { format!("10.77.{}.1", self.n).parse().unwrap() }
    }
    pub fn ip_b(&self, v6: bool) -> IpAddr {
        if v6 { format!("fd77:{}::2", self.n).parse().unwrap() } else { format!("10.77.{}.2", self.n).parse().unwrap() }
    }
    /// b's second IPv4 address (another peer prefix).
    pub fn ip_b2(&self) -> IpAddr {
        format!("10.78.{}.2", self.n).parse().unwrap()
    }

    /// What must be equal before injection and after revert.
    pub fn snapshot(&self, ns: &str, dev: &str) -> String {
        sh(&format!(
            "ip netns exec {ns} sh -c 'tc qdisc show; tc class show dev {dev}; tc filter show dev {dev} ingress; \
             tc filter show dev {dev} egress; ip link; ip -6 link'"
        ))
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

/// A driver on a private bpffs directory, with a heartbeat thread.
pub struct TestDriver {
    pub driver: Arc<NetworkDriver>,
    pub dir: PathBuf,
    beat: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
    pub keep_pins: bool,
}

pub fn test_bpffs() -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/chaosd-test-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst)))
}

pub fn probe() -> chaosd::probe::HostProbe {
    static PROBE: std::sync::OnceLock<chaosd::probe::HostProbe> = std::sync::OnceLock::new();
    PROBE.get_or_init(chaosd::probe::probe_host).clone()
}

impl TestDriver {
    pub fn new(grace: Duration) -> Self {
        Self::on(test_bpffs(), grace)
    }

    pub fn on(dir: PathBuf, grace: Duration) -> Self {
        Self::with_probe(dir, grace, probe())
    }

    /// A driver that attaches through clsact, as on kernels without TCX (6.1).
    pub fn clsact(grace: Duration) -> Self {
        let mut p = probe();
        p.tcx.available = false;
        Self::with_probe(test_bpffs(), grace, p)
    }

    pub fn with_probe(dir: PathBuf, grace: Duration, probe: chaosd::probe::HostProbe) -> Self {
        let config = NetConfig { grace, protected_ports: vec![22], bpffs: dir.clone(), ..NetConfig::default() };
        let driver = Arc::new(NetworkDriver::new(&probe, config).unwrap_or_else(|e| panic!("NetworkDriver::new: {e}")));
        let beat = Arc::new(AtomicBool::new(true));
        let (d, b) = (driver.clone(), beat.clone());
        let handle = thread::spawn(move || {
            while b.load(Ordering::SeqCst) {
                d.tick();
                thread::sleep(Duration::from_millis(100));
            }
        });
        Self { driver, dir, beat, handle: Some(handle), keep_pins: false }
    }

    /// Stops refreshing the heartbeat (as if the daemon were killed).
    pub fn stop_heartbeat(&mut self) {
        self.beat.store(false, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for TestDriver {
    fn drop(&mut self) {
        self.stop_heartbeat();
        if !self.keep_pins {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[derive(Default)]
pub struct Collect(pub Vec<Value>);

impl Recorder for Collect {
    fn record(&mut self, object: Value) -> Result<(), ApiError> {
        self.0.push(object);
        Ok(())
    }
}

pub fn selector(devices: &[&str], protocol: Protocol, ports: &[u16], direction: Direction) -> Selector {
    Selector {
        devices: devices.iter().map(|d| d.to_string()).collect(),
        protocol,
        ports: ports.iter().map(|&p| PortRange { first: p, last: p }).collect(),
        source_ports: vec![],
        destination_ports: vec![],
        peers: vec![],
        direction,
    }
}

pub fn experiment(
    id: &str,
    target: Target,
    selector: Selector,
    action: NetAction,
    duration: Option<Duration>,
) -> Experiment {
    Experiment::new(
        id.into(),
        target,
        Fault::Network(NetworkFault { selector, action }),
        duration,
        false,
        SystemTime::now(),
    )
}

/// Applies with no other active experiment; returns the recorded objects.
pub fn apply(d: &NetworkDriver, exp: &Experiment, active: &[Experiment]) -> Result<Vec<Value>, ApiError> {
    let mut rec = Collect::default();
    let ctx = ApplyContext { active, duration: exp.duration };
    d.apply(exp, &ctx, &mut rec).map(|_| rec.0)
}

/// A UDP socket bound inside namespace `ns`.
pub fn udp_in(ns: &str, addr: SocketAddr) -> UdpSocket {
    NetnsRef::named(ns).run(move || UdpSocket::bind(addr)).unwrap().unwrap_or_else(|e| panic!("bind udp {addr}: {e}"))
}

pub fn listen_in(ns: &str, addr: SocketAddr) -> TcpListener {
    NetnsRef::named(ns).run(move || TcpListener::bind(addr)).unwrap().unwrap_or_else(|e| panic!("listen {addr}: {e}"))
}

/// Whether a TCP connect from namespace `ns` to `addr` succeeds in time.
pub fn connects(ns: &str, addr: SocketAddr, timeout: Duration) -> bool {
    NetnsRef::named(ns).run(move || TcpStream::connect_timeout(&addr, timeout).is_ok()).unwrap()
}

/// Sends `count` datagrams from a socket in `from_ns` to `to` and counts
/// what a receiver in `to_ns` gets. `dropped` reports drops already known
/// (e.g. from the rule's counters) so the sender can pace itself and never
/// overrun the receiver's buffer.
pub fn udp_blast(from_ns: &str, to_ns: &str, to: SocketAddr, count: u32, dropped: impl Fn() -> u64) -> u32 {
    let rx = udp_in(to_ns, to);
    rx.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let any: SocketAddr = if to.is_ipv6() { "[::]:0".parse().unwrap() } else { "0.0.0.0:0".parse().unwrap() };
    let tx = udp_in(from_ns, any);
    let received = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let (r, dn) = (received.clone(), done.clone());
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 64];
        loop {
            match rx.recv(&mut buf) {
                Ok(_) => {
                    r.fetch_add(1, Ordering::SeqCst);
                }
                Err(_) if dn.load(Ordering::SeqCst) => break,
                Err(_) => {}
            }
        }
    });
    let base = dropped();
    let payload = [0x5au8; 32];
    for i in 0..count {
        tx.send_to(&payload, to).unwrap_or_else(|e| panic!("send to {to}: {e}"));
        if i % 256 == 255 {
            // Wait until everything sent is either received or known dropped.
            let sent = (i + 1) as u64;
            for _ in 0..2000 {
                if received.load(Ordering::SeqCst) as u64 + (dropped() - base) >= sent {
                    break;
                }
                thread::sleep(Duration::from_micros(200));
            }
        }
    }
    thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    received.load(Ordering::SeqCst)
}

/// Whether one datagram from `from_ns` reaches `to` (three tries).
pub fn udp_passes(from_ns: &str, to_ns: &str, to: SocketAddr) -> bool {
    udp_passes_sized(from_ns, to_ns, to, 4)
}

/// Like `udp_passes` with a datagram of `len` bytes (above the MTU it
/// leaves in fragments).
pub fn udp_passes_sized(from_ns: &str, to_ns: &str, to: SocketAddr, len: usize) -> bool {
    let rx = udp_in(to_ns, to);
    rx.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let any: SocketAddr = if to.is_ipv6() { "[::]:0".parse().unwrap() } else { "0.0.0.0:0".parse().unwrap() };
    let tx = udp_in(from_ns, any);
    let payload = vec![0x5a; len];
    let mut buf = vec![0u8; len + 1];
    for _ in 0..3 {
        tx.send_to(&payload, to).unwrap();
        if let Ok(n) = rx.recv(&mut buf) {
            assert_eq!(n, len, "a whole datagram arrives or none");
            return true;
        }
    }
    false
}

pub fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}
