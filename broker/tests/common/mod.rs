//! Shared test helpers: brokers on loopback (in-process or as a child
//! process), the project's client, external tools. Everything started here is
//! stopped by a guard's Drop, also when the test fails.
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod cluster;
pub mod nodes;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use broker::client::{Client, connect_packet};
use broker::codec::{Packet, Properties, QoS, SubOptions, Subscribe, Version};
use broker::config::Config;
use tokio_util::sync::CancellationToken;

pub const T: Duration = Duration::from_secs(5);

/// A broker inside the test process, on 127.0.0.1 port 0.
pub struct TestBroker {
    pub addr: SocketAddr,
    pub http: SocketAddr,
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn start(f: impl FnOnce(&mut Config)) -> TestBroker {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config { data_dir: None, sys_interval_secs: 0, node_name: "test".into(), ..Config::default() };
    f(&mut cfg);
    if cfg.data_dir.as_deref() == Some(std::path::Path::new("TEMP")) {
        cfg.data_dir = Some(dir.path().join("data"));
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind mqtt");
    let h = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let (addr, http) = (l.local_addr().expect("addr"), h.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = broker::server::run(cfg, l, Some(h), s).await {
            panic!("broker failed: {e:?}");
        }
    });
    TestBroker { addr, http, dir, shutdown }
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// The `broker` binary as a child process (for kill -9).
pub struct BrokerProc {
    pub child: Child,
    pub addr: SocketAddr,
    pub http: SocketAddr,
}

impl BrokerProc {
    pub fn spawn(data_dir: &std::path::Path, port: u16, extra: &[&str]) -> BrokerProc {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        // The HTTP port is free when picked, but a test running in parallel
        // may take it before the broker binds it (a CI run failed so: the
        // broker exited with "Address already in use"): then pick another.
        for attempt in 1..=5 {
            let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
            let child = Command::new(env!("CARGO_BIN_EXE_broker"))
                .args(["--mqtt-listen", &addr.to_string(), "--http-listen", &http.to_string()])
                .arg("--data-dir")
                .arg(data_dir)
                .args(extra)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawning the broker binary");
            let mut p = BrokerProc { child, addr, http };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if std::net::TcpStream::connect(addr).is_ok() {
                    return p;
                }
                if let Some(status) = p.child.try_wait().expect("waiting for the broker") {
                    assert!(attempt < 5, "broker exited before listening on {addr} ({status}), 5 times");
                    eprintln!("broker exited before listening on {addr} ({status}): trying another HTTP port");
                    break;
                }
                assert!(Instant::now() < deadline, "broker did not listen on {addr}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A child process killed on drop (mosquitto_sub, python, ...).
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn connect(addr: SocketAddr, v: Version, id: &str, clean: bool) -> Client {
    connect_with(addr, v, id, clean, Properties::default()).await
}

pub async fn connect_with(addr: SocketAddr, v: Version, id: &str, clean: bool, props: Properties) -> Client {
    let mut c = connect_packet(v, id, clean, 30);
    c.props = props;
    let (cl, ack) = Client::connect(addr, c).await.unwrap_or_else(|e| panic!("connect {id}: {e}"));
    assert_eq!(ack.code, 0, "connack for {id}: {ack:?}");
    cl
}

pub async fn subscribe(c: &mut Client, filter: &str, qos: QoS) -> Vec<u8> {
    subscribe_opts(c, filter, SubOptions::qos(qos), Properties::default()).await
}

pub async fn subscribe_opts(c: &mut Client, filter: &str, o: SubOptions, props: Properties) -> Vec<u8> {
    let pid = 9;
    c.send(&Packet::Subscribe(Subscribe { pid, props, filters: vec![(filter.into(), o)] }))
        .await
        .expect("send subscribe");
    match c.recv(T).await.expect("suback") {
        Packet::SubAck(a) => {
            assert_eq!(a.pid, pid);
            a.codes
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// The next packet, within `T`.
pub async fn next(c: &mut Client) -> Packet {
    match c.recv(T).await {
        Ok(p) => p,
        Err(e) => panic!("waiting for a packet: {e}"),
    }
}

/// Asserts nothing arrives within `d`.
pub async fn nothing(c: &mut Client, d: Duration) {
    if let Ok(p) = c.recv(d).await {
        panic!("expected nothing, got {p:?}");
    }
}

/// The packet the broker closes with (v5 DISCONNECT), then EOF.
pub async fn expect_disconnect(c: &mut Client, code: u8) {
    match c.recv(T).await {
        Ok(Packet::Disconnect(d)) => assert_eq!(d.code, code, "disconnect reason"),
        other => panic!("expected DISCONNECT {code:#x}, got {other:?}"),
    }
    assert!(matches!(c.recv(T).await, Err(broker::client::ClientError::Closed)), "connection not closed");
}

pub async fn expect_closed(c: &mut Client) {
    match c.recv(T).await {
        Err(broker::client::ClientError::Closed) | Err(broker::client::ClientError::Io(_)) => {}
        other => panic!("expected the broker to close, got {other:?}"),
    }
}

/// GET over plain HTTP/1.1 on loopback.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("http connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("http write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("http read");
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status");
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// Value of one Prometheus series (exact label text).
pub fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("series {series} not in metrics"))
}

/// An external tool, required: missing means the test fails and says how to fix it.
pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = PathBuf::from(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} is required by this test but not installed: run scripts/setup.sh (Debian packages mosquitto, mosquitto-clients, python3-paho-mqtt)"
    );
}

/// Debian's python3 with paho-mqtt 1.6 (not a pyenv shim).
pub fn python_paho() -> PathBuf {
    let py = tool("python3");
    let ok = Command::new(&py).args(["-c", "import paho.mqtt.client"]).status().map(|s| s.success()).unwrap_or(false);
    assert!(
        ok,
        "{} cannot import paho.mqtt.client: install the Debian package python3-paho-mqtt (scripts/setup.sh)",
        py.display()
    );
    py
}
