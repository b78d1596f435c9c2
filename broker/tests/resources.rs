//! What the broker holds for connections: its memory comes back to a level
//! when they close, and a burst of connections fits its listen backlog.
//! Both run the `broker` binary and real TCP clients; the backlog tests need
//! root (a network namespace of their own).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use broker::client::connect_packet;
use broker::codec::{Packet, Version};
use common::*;

/// Lets this process (and the broker it starts) hold `need` descriptors.
fn raise_fd_limit(need: u64) {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0, "getrlimit");
        if l.rlim_cur < need {
            assert!(l.rlim_max >= need, "this test needs {need} open files, the hard limit is {}", l.rlim_max);
            l.rlim_cur = need;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &l), 0, "setrlimit");
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading the broker's status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// A v3.1.1 CONNECT, clean session, keep alive 0.
fn connect_bytes(id: &str) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    broker::codec::encode(
        &Packet::Connect(Box::new(connect_packet(Version::V311, id, true, 0))),
        Version::V311,
        &mut b,
    );
    b.to_vec()
}

/// Sends CONNECT on every stream, then expects every CONNACK (accepted).
fn connect_all(streams: &mut [TcpStream], tag: &str) {
    for (i, s) in streams.iter_mut().enumerate() {
        s.write_all(&connect_bytes(&format!("{tag}-{i}"))).expect("sending CONNECT");
    }
    for (i, s) in streams.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).unwrap_or_else(|e| panic!("CONNACK for client {tag}-{i}: {e}"));
        assert_eq!(ack, [0x20, 2, 0, 0], "CONNACK for client {tag}-{i}");
    }
}

fn wait_for_no_connections(http: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = http_get(http, "/metrics");
        let n = metric(&body, "broker_connections{node=\"broker\"}");
        if n == 0.0 {
            return;
        }
        assert!(Instant::now() < deadline, "{n} connections still open 20 s after every client closed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Clients connected at once in each round: enough that the memory the
/// connections take dwarfs the broker's own (about 5 MB), few enough for
/// ten rounds in seconds.
const CLIENTS: usize = 2000;

/// Ten rounds of many clients connecting at once, then closing: what the
/// broker's RSS settles at after a round is what the next ones reuse, so
/// the tenth round ends within 20% of the second (the first grows the heap).
#[test]
fn memory_levels_off_over_rounds_of_connections() {
    raise_fd_limit(CLIENTS as u64 * 2 + 256);
    let dir = tempfile::tempdir().expect("tempdir");
    let b = BrokerProc::spawn(dir.path(), free_port(), &[]);
    let pid = b.child.id();
    let mut rss = Vec::new();
    for round in 1..=10 {
        let mut streams: Vec<TcpStream> =
            (0..CLIENTS).map(|_| TcpStream::connect_timeout(&b.addr, T).expect("connecting to the broker")).collect();
        connect_all(&mut streams, &format!("r{round}"));
        drop(streams);
        wait_for_no_connections(b.http);
        rss.push(rss_kib(pid));
    }
    let mb: Vec<String> = rss.iter().map(|k| format!("{:.1}", *k as f64 / 1024.0)).collect();
    eprintln!("broker RSS after each round of {CLIENTS} clients (MB): {}", mb.join(" "));
    let (second, tenth) = (rss[1], rss[9]);
    assert!(
        tenth * 5 <= second * 6,
        "RSS after round 10 ({} MB) is more than 20% above round 2 ({} MB); every round (MB): {}",
        mb[9],
        mb[1],
        mb.join(" ")
    );
}

/// A network namespace of the test's own, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("brk-{tag}-{}", std::process::id());
        let ip = tool("ip");
        let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
        assert!(ok(Command::new(&ip).args(["netns", "add", &name])), "ip netns add {name} (the test needs root)");
        let ns = Netns(name);
        assert!(ok(Command::new(&ip).args(["-n", &ns.0, "link", "set", "lo", "up"])), "lo up in {}", ns.0);
        ns
    }

    /// Runs `f` on a thread inside the namespace: the sockets it opens
    /// are the namespace's.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(format!("/run/netns/{}", self.0)).expect("opening the namespace");
                // SAFETY: setns on a valid descriptor; it moves only this thread.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new(tool("ip")).args(["netns", "del", &self.0]).status();
    }
}

/// TcpExtListenOverflows of the network namespace `pid` is in: SYNs dropped
/// because the listener's accept queue was full.
fn listen_overflows(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/netstat")).expect("reading netstat");
    let mut tcpext = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (tcpext.next().expect("TcpExt names"), tcpext.next().expect("TcpExt values"));
    let i = names.split_whitespace().position(|n| n == "ListenOverflows").expect("ListenOverflows in TcpExt");
    values.split_whitespace().nth(i).and_then(|v| v.parse().ok()).expect("ListenOverflows value")
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on the broker this test started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0, "kill({pid}, {sig})");
}

fn state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading the broker's stat");
    stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next()).expect("state in /proc/PID/stat")
}

/// Connections opened in one burst, while the broker accepts none.
const BURST: usize = 3000;

/// Starts the broker in a namespace of its own with `extra` flags, opens
/// `BURST` connections to it while it is stopped (SIGSTOP: it accepts none
/// until the burst is over, however fast this machine is, so the backlog
/// alone has to hold the burst) and returns the listen overflows that the
/// burst caused. With `connacks` and no overflow, every client must then get
/// its CONNACK.
fn burst_against_a_stopped_broker(tag: &str, extra: &[&str], connacks: bool) -> u64 {
    raise_fd_limit(BURST as u64 * 2 + 256);
    let ns = Netns::new(tag);
    // The kernel's default since Linux 5.4, set so that the result does not
    // depend on the kernel: the cap the broker's default backlog meets.
    ns.run(|| std::fs::write("/proc/sys/net/core/somaxconn", "4096").expect("setting net.core.somaxconn"));
    let addr: SocketAddr = "127.0.0.1:1883".parse().expect("addr");
    let child = Command::new(tool("ip"))
        .args(["netns", "exec", &ns.0])
        .arg(env!("CARGO_BIN_EXE_broker"))
        .args(["--mqtt-listen", &addr.to_string()])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning the broker in the namespace");
    // `ip netns exec` execs the broker: this is its pid.
    let mut broker = ChildGuard(child);
    let pid = broker.0.id();
    ns.run(|| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            assert!(broker.0.try_wait().expect("waiting for the broker").is_none(), "the broker exited");
            assert!(Instant::now() < deadline, "the broker did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        signal(pid, libc::SIGSTOP);
        while state(pid) != 'T' {
            std::thread::sleep(Duration::from_millis(1));
        }
        let before = listen_overflows(pid);
        let sockets: Vec<socket2::Socket> = (0..BURST)
            .map(|_| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
                s.set_nonblocking(true).expect("nonblocking");
                match s.connect(&addr.into()) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                    Err(e) => panic!("connect: {e}"),
                }
                s
            })
            .collect();
        // Loopback completes (or drops) each handshake before connect
        // returns; a moment more for the last ones.
        std::thread::sleep(Duration::from_millis(200));
        let overflows = listen_overflows(pid) - before;
        signal(pid, libc::SIGCONT);
        if connacks && overflows == 0 {
            let mut streams: Vec<TcpStream> = sockets
                .into_iter()
                .map(|s| {
                    s.set_nonblocking(false).expect("blocking");
                    s.into()
                })
                .collect();
            connect_all(&mut streams, tag);
        }
        overflows
    })
}

/// A burst of thousands of connections (fewer than net.core.somaxconn) opened
/// while the broker is busy waits in the backlog of the default
/// configuration: no SYN is dropped, no client stalls for a retransmission,
/// and every client is served once the broker runs again.
#[test]
fn a_burst_of_connections_fits_the_default_backlog() {
    let overflows = burst_against_a_stopped_broker("backlog-default", &[], true);
    assert_eq!(overflows, 0, "{BURST} connections in a burst: {overflows} listen overflows (dropped SYNs)");
}

/// The same burst against a backlog of 128 (tokio's and std's) overflows:
/// what the test above counts does see a backlog too small for the burst.
#[test]
fn a_burst_of_connections_overflows_a_backlog_of_128() {
    let overflows = burst_against_a_stopped_broker("backlog-128", &["--listen-backlog", "128"], false);
    assert!(overflows > 0, "{BURST} connections in a burst into a backlog of 128: no listen overflow counted");
}
