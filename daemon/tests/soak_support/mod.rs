//! Support of the randomized soak (`soak.rs`): two network namespaces
//! joined by a veth pair, daemons the test can SIGKILL / SIGSTOP / restart,
//! traffic probes whose sockets are opened inside the namespaces, and
//! inspection of what chaosd left in the kernel (`ip`, `tc`, TCX queries,
//! the daemon's pinned maps). Everything the test creates is removed by a
//! guard's `Drop`, also when the test panics.
#![allow(dead_code, reason = "helpers of one test binary")]

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use chaosd::netns::NetnsRef;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

pub fn chaosd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_chaosd"))
}

pub fn chaosctl_bin() -> PathBuf {
    let p = chaosd_bin().with_file_name("chaosctl");
    assert!(p.exists(), "{} is missing: build the workspace first (cargo build --release --workspace)", p.display());
    p
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a shell command; Err carries stderr.
pub fn sh(cmd: &str) -> Result<String, String> {
    let out = Command::new("sh").arg("-c").arg(cmd).output().map_err(|e| format!("sh -c {cmd}: {e}"))?;
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(format!("`{cmd}` failed ({}): {}", out.status, text(&out.stderr).trim()))
    }
}

// ---------------------------------------------------------------- topology

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    A,
    B,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fam {
    V4,
    V6,
}

/// Each side has an address in two prefixes per family: `Primary`
/// (10.91.0.0/24, fd91::/64 — the ones faults name with `--peer`) and
/// `Secondary` (10.92.0.0/24, fd92::/64 — outside every peer CIDR).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pfx {
    Primary,
    Secondary,
}

/// Two namespaces `a` (device `va`) and `b` (device `vb`) joined by a veth
/// pair; deleted on drop.
pub struct Net {
    pub a: String,
    pub b: String,
}

impl Net {
    pub fn new() -> Result<Self, String> {
        let tag = std::process::id();
        let net = Net { a: format!("chaosd-soak-{tag}-a"), b: format!("chaosd-soak-{tag}-b") };
        let (a, b) = (&net.a, &net.b);
        // Leftovers of an earlier run with the same pid (unlikely) go first.
        let _ = sh(&format!("ip netns del {a} 2>/dev/null; ip netns del {b} 2>/dev/null; true"));
        sh(&format!(
            "ip netns add {a} && ip netns add {b} && \
             ip -n {a} link add va type veth peer name vb netns {b} && \
             ip -n {a} link set lo up && ip -n {b} link set lo up && \
             ip -n {a} addr add 10.91.0.1/24 dev va && ip -n {b} addr add 10.91.0.2/24 dev vb && \
             ip -n {a} addr add 10.92.0.1/24 dev va && ip -n {b} addr add 10.92.0.2/24 dev vb && \
             ip -n {a} addr add fd91::1/64 dev va nodad && ip -n {b} addr add fd91::2/64 dev vb nodad && \
             ip -n {a} addr add fd92::1/64 dev va nodad && ip -n {b} addr add fd92::2/64 dev vb nodad && \
             ip -n {a} link set va up && ip -n {b} link set vb up"
        ))?;
        // Wait until every address answers (carrier, neighbours).
        for from in [Side::A, Side::B] {
            for fam in [Fam::V4, Fam::V6] {
                for pfx in [Pfx::Primary, Pfx::Secondary] {
                    let flow = Flow { from, proto: Proto::Udp, port: 7001, fam, pfx };
                    let ok = (0..20).any(|_| udp_count(&net, &flow, 1, 16, Duration::from_millis(200), true) == 1);
                    if !ok {
                        return Err(format!("{flow:?} does not pass in the fresh topology"));
                    }
                }
            }
        }
        Ok(net)
    }

    pub fn ns(&self, s: Side) -> &str {
        match s {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    pub fn dev(s: Side) -> &'static str {
        match s {
            Side::A => "va",
            Side::B => "vb",
        }
    }

    pub fn addr(s: Side, fam: Fam, pfx: Pfx) -> IpAddr {
        let host = match s {
            Side::A => 1,
            Side::B => 2,
        };
        let net = match pfx {
            Pfx::Primary => 91,
            Pfx::Secondary => 92,
        };
        match fam {
            Fam::V4 => format!("10.{net}.0.{host}").parse().unwrap(),
            Fam::V6 => format!("fd{net}::{host}").parse().unwrap(),
        }
    }

    /// The CIDR a fault names with `--peer` (the primary prefix).
    pub fn peer_cidr(fam: Fam) -> &'static str {
        match fam {
            Fam::V4 => "10.91.0.0/24",
            Fam::V6 => "fd91::/64",
        }
    }

    pub fn inode(&self, s: Side) -> Option<u64> {
        std::fs::metadata(format!("/run/netns/{}", self.ns(s))).ok().map(|m| m.ino())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

// ----------------------------------------------------------------- traffic

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

/// Traffic from `from` to the other side's address (`fam`, `pfx`) on
/// `port` (the server's port; the client's port is ephemeral).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub from: Side,
    pub proto: Proto,
    pub port: u16,
    pub fam: Fam,
    pub pfx: Pfx,
}

impl Flow {
    pub fn to(&self) -> Side {
        self.from.other()
    }
    pub fn dst(&self) -> SocketAddr {
        SocketAddr::new(Net::addr(self.to(), self.fam, self.pfx), self.port)
    }
    pub fn src(&self) -> SocketAddr {
        SocketAddr::new(Net::addr(self.from, self.fam, self.pfx), 0)
    }
    pub fn describe(&self) -> String {
        let p = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        format!("{p} {:?}->{:?} {} -> {}", self.from, self.to(), self.src().ip(), self.dst())
    }
}

fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    NetnsRef::named(ns).run(f).unwrap_or_else(|e| panic!("entering namespace {ns}: {e}"))
}

fn big_rcvbuf(s: &UdpSocket) {
    let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::RcvBuf, &(4 << 20));
}

/// Sends `n` datagrams of `size` bytes along `flow` and returns how many
/// arrived. With `stop_at_n` it returns as soon as all arrived; otherwise
/// once nothing arrived for `settle`; in any case `settle` + 1 s after the
/// last send.
pub fn udp_count(net: &Net, flow: &Flow, n: u32, size: usize, settle: Duration, stop_at_n: bool) -> u32 {
    let (dst, src) = (flow.dst(), flow.src());
    let rx = match in_ns(net.ns(flow.to()), move || UdpSocket::bind(dst)) {
        Ok(s) => s,
        Err(e) => panic!("bind udp {dst} in {}: {e}", net.ns(flow.to())),
    };
    big_rcvbuf(&rx);
    let tx = in_ns(net.ns(flow.from), move || UdpSocket::bind(src)).unwrap_or_else(|e| panic!("bind udp {src}: {e}"));
    // Each probe's datagrams carry its own tag: datagrams of an earlier
    // probe that a shaping queue still held are not counted.
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let tag = (u64::from(std::process::id()) << 32) | PROBES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut payload = vec![0x5au8; size.max(8)];
    payload[..8].copy_from_slice(&tag.to_be_bytes());
    let mut got = 0u32;
    let mut buf = vec![0u8; size.max(8) + 16];
    rx.set_nonblocking(true).unwrap();
    let mut drain = |got: &mut u32| {
        while let Ok(n) = rx.recv(&mut buf) {
            if n >= 8 && buf[..8] == tag.to_be_bytes() {
                *got += 1;
            }
        }
    };
    for i in 0..n {
        // A send may fail transiently (ENOBUFS under a shaping qdisc): that
        // datagram is simply not sent; count it as sent anyway (it did not
        // arrive).
        let _ = tx.send_to(&payload, dst);
        if i % 32 == 31 {
            thread::sleep(Duration::from_millis(1));
            drain(&mut got);
        }
    }
    let sent_at = Instant::now();
    let mut last_change = sent_at;
    loop {
        let before = got;
        drain(&mut got);
        if got != before {
            last_change = Instant::now();
        }
        if stop_at_n && got >= n {
            break;
        }
        if sent_at.elapsed() >= settle + Duration::from_secs(1) {
            break;
        }
        if !stop_at_n && last_change.elapsed() >= settle {
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    got
}

/// Whether a TCP connection along `flow` is established within `timeout`.
pub fn tcp_connects(net: &Net, flow: &Flow, timeout: Duration) -> bool {
    let dst = flow.dst();
    let listener =
        in_ns(net.ns(flow.to()), move || TcpListener::bind(dst)).unwrap_or_else(|e| panic!("listen {dst}: {e}"));
    let ok = in_ns(net.ns(flow.from), move || TcpStream::connect_timeout(&dst, timeout)).map(|s| {
        let _ = nix::sys::socket::setsockopt(
            &s,
            nix::sys::socket::sockopt::Linger,
            &libc::linger { l_onoff: 1, l_linger: 0 },
        );
    });
    drop(listener);
    ok.is_ok()
}

/// Sends `total` bytes over one TCP connection along `flow` and returns how
/// many the receiver got within `window` (from the start of the connect);
/// returns early once all arrived. A connection that cannot be made counts 0.
pub fn tcp_bulk(net: &Net, flow: &Flow, total: usize, window: Duration) -> usize {
    let dst = flow.dst();
    let listener =
        in_ns(net.ns(flow.to()), move || TcpListener::bind(dst)).unwrap_or_else(|e| panic!("listen {dst}: {e}"));
    listener.set_nonblocking(true).unwrap();
    let start = Instant::now();
    let deadline = start + window;
    let from_ns = net.ns(flow.from).to_string();
    // The connection starts with this probe's tag: a connection of an
    // earlier probe that a shaping queue held back is not counted.
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let tag = (u64::from(std::process::id()) << 32) | PROBES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done_w = done.clone();
    let writer = thread::spawn(move || {
        let Ok(mut s) = NetnsRef::named(&from_ns)
            .run(move || TcpStream::connect_timeout(&dst, window))
            .unwrap_or_else(|e| panic!("entering {from_ns}: {e}"))
        else {
            return;
        };
        let _ = nix::sys::socket::setsockopt(
            &s,
            nix::sys::socket::sockopt::Linger,
            &libc::linger { l_onoff: 1, l_linger: 0 },
        );
        let _ = s.set_write_timeout(Some(Duration::from_millis(50)));
        // The tag first (a small write that fits any send buffer).
        if s.write_all(&tag.to_be_bytes()).is_err() {
            return;
        }
        let chunk = vec![0xa5u8; 8192];
        let mut sent = 0;
        while sent < total && Instant::now() < deadline {
            match s.write(&chunk[..chunk.len().min(total - sent)]) {
                Ok(n) => sent += n,
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
        // Keep the connection open until the window ends (closing with
        // linger 0 would reset it and discard what is in flight).
        while Instant::now() < deadline && !done_w.load(std::sync::atomic::Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(10));
        }
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 65536];
    'accept: while Instant::now() < deadline {
        let mut c = match listener.accept() {
            Ok((c, _)) => c,
            Err(_) => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        c.set_nonblocking(false).unwrap();
        let read_some = |c: &mut TcpStream, buf: &mut [u8]| -> Option<usize> {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            c.set_read_timeout(Some(left.min(Duration::from_millis(50)))).unwrap();
            match c.read(buf) {
                Ok(0) => None,
                Ok(n) => Some(n),
                Err(_) => Some(0),
            }
        };
        let mut head = [0u8; 8];
        let mut h = 0;
        while h < 8 && Instant::now() < deadline {
            match read_some(&mut c, &mut head[h..]) {
                Some(n) => h += n,
                None => continue 'accept,
            }
        }
        if h < 8 || head != tag.to_be_bytes() {
            continue 'accept;
        }
        while got < total && Instant::now() < deadline {
            match read_some(&mut c, &mut buf) {
                Some(n) => got += n,
                None => break,
            }
        }
        break;
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    got
}

// ------------------------------------------------------------------ daemon

/// A `chaosd serve` process the test can kill, stop, continue and restart
/// on the same directories. Killed on drop (continued first if stopped);
/// its BPF pin directory is removed on drop when it owns it.
pub struct SoakDaemon {
    pub label: String,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpf_dir: PathBuf,
    pub log: PathBuf,
    pub grace: Duration,
    pub owns_bpf_dir: bool,
    child: Option<Child>,
}

impl SoakDaemon {
    pub fn new(
        label: &str,
        socket: PathBuf,
        state_dir: PathBuf,
        bpf_dir: PathBuf,
        log: PathBuf,
        grace: Duration,
    ) -> Self {
        Self { label: label.into(), socket, state_dir, bpf_dir, log, grace, owns_bpf_dir: true, child: None }
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.label);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("open daemon log");
        let mut marker = log.try_clone().unwrap();
        let _ = writeln!(marker, "===== soak: starting {} =====", self.label);
        let child = Command::new(chaosd_bin())
            .args(["serve", "--socket"])
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--bpf-dir")
            .arg(&self.bpf_dir)
            .arg("--grace")
            .arg(format!("{}ms", self.grace.as_millis()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn chaosd");
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The exit status if the process has exited (and forgets it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(st)
    }

    /// Waits until `status` answers; Err if the process exits or `limit` passes.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(st) = self.exited() {
                return Err(format!("{} exited with {st} while starting", self.label));
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() && self.ctl(&["status"]).status.success() {
                return Ok(start.elapsed());
            }
            thread::sleep(Duration::from_millis(30));
        }
        Err(format!("{} did not answer `status` within {limit:?}", self.label))
    }

    /// Runs chaosctl against this daemon; a call that takes more than 30 s
    /// (a daemon that hangs) is killed and reported as failed.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut child = Command::new(chaosctl_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run chaosctl");
        let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let out_t = thread::spawn(move || {
            let mut v = Vec::new();
            let _ = so.read_to_end(&mut v);
            v
        });
        let err_t = thread::spawn(move || {
            let mut v = Vec::new();
            let _ = se.read_to_end(&mut v);
            v
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break child.wait().unwrap();
            }
            thread::sleep(Duration::from_millis(2));
        };
        let stdout = out_t.join().unwrap();
        let mut stderr = err_t.join().unwrap();
        if !status.success() && stderr.is_empty() {
            stderr = format!("chaosctl {args:?} did not finish within 30 s (killed)").into_bytes();
        }
        Output { status, stdout, stderr }
    }

    fn signal(&self, sig: Signal) {
        if let Some(pid) = self.pid() {
            let _ = kill(Pid::from_raw(pid as i32), sig);
        }
    }

    pub fn sigstop(&self) {
        self.signal(Signal::SIGSTOP);
    }

    pub fn sigcont(&self) {
        self.signal(Signal::SIGCONT);
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn term(&mut self, limit: Duration) -> Result<ExitStatus, String> {
        let Some(mut c) = self.child.take() else { return Err(format!("{} is not running", self.label)) };
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return Err(format!("{} did not exit within {limit:?} of SIGTERM", self.label));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let all = self.log_text();
        let v: Vec<&str> = all.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for SoakDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.owns_bpf_dir {
            let _ = std::fs::remove_dir_all(&self.bpf_dir);
        }
    }
}

/// chaosd processes on this host that this test did not start (another
/// test's daemon sweeps every namespace on the host at its start, which
/// would disturb this one: named in failure messages).
pub fn foreign_daemons(mine: &[u32]) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if mine.contains(&pid) {
            continue;
        }
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let args: Vec<String> = cmd.split(|b| *b == 0).map(text).collect();
        if args.first().is_some_and(|a| a.ends_with("/chaosd") || a == "chaosd")
            && args.get(1).is_some_and(|a| a == "serve")
        {
            out.push(format!("pid {pid}: {}", args.join(" ")));
        }
    }
    out
}

// ------------------------------------------------------ kernel inspection

/// chaosd-marked objects found in one namespace.
#[derive(Debug, Default)]
pub struct Marked {
    pub ifbs: Vec<String>,
    pub htb_roots: Vec<String>,
    pub filters: Vec<String>,
    pub tcx: Vec<String>,
}

impl Marked {
    pub fn is_empty(&self) -> bool {
        self.ifbs.is_empty() && self.htb_roots.is_empty() && self.filters.is_empty() && self.tcx.is_empty()
    }
}

/// Links of a namespace (names), from `ip -o link`.
pub fn links(ns: &str) -> Vec<String> {
    let out = sh(&format!("ip -n {ns} -o link show")).unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

/// What chaosd marks as its own in namespace `ns`: `chaosd-ifb*` devices,
/// HTB roots `c4a0:`, tc filters named chaosd_*, TCX programs named chaosd*.
pub fn marked(ns: &str) -> Marked {
    let mut m = Marked::default();
    let names = links(ns);
    m.ifbs = names.iter().filter(|n| n.starts_with("chaosd-ifb")).cloned().collect();
    let qdiscs = sh(&format!("tc -n {ns} qdisc show")).unwrap_or_default();
    m.htb_roots = qdiscs.lines().filter(|l| l.contains("htb c4a0:")).map(|l| l.trim().to_string()).collect();
    for dev in &names {
        for dir in ["ingress", "egress"] {
            let f = sh(&format!("tc -n {ns} filter show dev {dev} {dir} 2>/dev/null")).unwrap_or_default();
            for l in f.lines().filter(|l| l.contains("chaosd")) {
                m.filters.push(format!("{dev} {dir}: {}", l.trim()));
            }
        }
    }
    let devs = names.clone();
    m.tcx = in_ns(ns, move || {
        use aya::programs::{SchedClassifier, tc::TcAttachType};
        let mut found = Vec::new();
        for dev in &devs {
            for (dir, t) in [("ingress", TcAttachType::Ingress), ("egress", TcAttachType::Egress)] {
                if let Ok((_, progs)) = SchedClassifier::query_tcx(dev, t) {
                    for p in progs {
                        let name = p.name_as_str().unwrap_or("?").to_string();
                        if name.starts_with("chaosd") {
                            found.push(format!("{dev} {dir}: TCX program {name} (id {})", p.id()));
                        }
                    }
                }
            }
        }
        found
    });
    m
}

/// What a daemon's pinned maps hold: active rule ids, and device entries
/// (namespace inode, ifindex, direction).
#[derive(Debug, Default)]
pub struct Pinned {
    pub rules: Vec<u32>,
    pub devices: Vec<(u32, u32, u32)>,
    pub ns_dirs: Vec<String>,
}

pub fn pinned(dir: &Path) -> Result<Pinned, String> {
    use aya::maps::{Array, HashMap, Map, MapData};
    use chaosd_common::{ACTION_NONE, DevConf, DevKey, MAX_RULES, Rule};
    let mut p = Pinned::default();
    if !dir.exists() {
        return Ok(p);
    }
    let open = |name: &str| -> Result<MapData, String> {
        MapData::from_pin(dir.join(name)).map_err(|e| format!("open pinned map {}/{name}: {e}", dir.display()))
    };
    let rules: Array<MapData, Rule> = Map::from_map_data(open("CHAOSD_RULES")?)
        .map_err(|e| e.to_string())?
        .try_into()
        .map_err(|e: aya::maps::MapError| e.to_string())?;
    for id in 0..MAX_RULES {
        if rules.get(&id, 0).is_ok_and(|r| r.action != ACTION_NONE) {
            p.rules.push(id);
        }
    }
    let devices: HashMap<MapData, DevKey, DevConf> = Map::from_map_data(open("CHAOSD_DEVICES")?)
        .map_err(|e| e.to_string())?
        .try_into()
        .map_err(|e: aya::maps::MapError| e.to_string())?;
    for k in devices.keys().flatten() {
        p.devices.push((k.netns, k.ifindex, k.dir));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("ns-") {
                p.ns_dirs.push(n);
            }
        }
    }
    Ok(p)
}
