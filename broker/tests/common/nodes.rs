//! Cluster nodes as real `broker` processes on loopback, for tests that
//! kill them (SIGKILL or SIGTERM) and start them again on the same ports and data
//! directory. Each node's stderr goes to a log file the test can read.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, http_get};

pub struct ProcNode {
    pub name: String,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    pub cluster: SocketAddr,
    pub data: PathBuf,
    pub log: PathBuf,
    seeds: Vec<SocketAddr>,
    extra: Vec<String>,
    child: Option<Child>,
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Fast failure detection, so that tests need not wait long for a state.
pub const FAST: [&str; 6] =
    ["--cluster-heartbeat-ms", "100", "--cluster-suspect-after-ms", "400", "--cluster-down-after-ms", "1500"];

impl ProcNode {
    /// Starts node `name` with its data and log under `dir`, joining `seeds`.
    pub fn spawn(dir: &Path, name: &str, seeds: &[SocketAddr], extra: &[&str]) -> ProcNode {
        let mut n = ProcNode {
            name: name.into(),
            mqtt: addr(free_port()),
            http: addr(free_port()),
            cluster: addr(free_port()),
            data: dir.join(name).join("data"),
            log: dir.join(name).join("broker.log"),
            seeds: seeds.to_vec(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        std::fs::create_dir_all(dir.join(name)).expect("node dir");
        n.start();
        n
    }

    /// Starts the process again (same ports, data directory and log).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is running", self.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_broker"));
        cmd.args(["--node-name", &self.name])
            .args(["--mqtt-listen", &self.mqtt.to_string()])
            .args(["--http-listen", &self.http.to_string()])
            .args(["--cluster-listen", &self.cluster.to_string()])
            .arg("--data-dir")
            .arg(&self.data)
            .args(FAST)
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        if !self.seeds.is_empty() {
            let seeds: Vec<String> = self.seeds.iter().map(|s| s.to_string()).collect();
            cmd.args(["--join", &seeds.join(",")]);
        }
        self.child = Some(cmd.spawn().expect("spawning the broker binary"));
        // Listening once HTTP answers (bound last of the three).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(self.http).is_ok() && std::net::TcpStream::connect(self.mqtt).is_ok() {
                return;
            }
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().expect("wait")) {
                panic!("{} exited before listening ({st}); its log:\n{}", self.name, self.log_text());
            }
            assert!(Instant::now() < deadline, "{} did not listen within 20 s", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: nothing is flushed, nothing said to peers.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the process is frozen (its sockets stay open, nothing is
    /// answered) until `kill9`.
    pub fn freeze(&self) {
        let c = self.child.as_ref().expect("running");
        let pid = libc::pid_t::try_from(c.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    }

    /// SIGTERM, the graceful stop: waits (at most 10 s) for the process to
    /// exit, then SIGKILLs it and fails.
    pub fn term(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        let pid = libc::pid_t::try_from(c.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.try_wait().expect("wait").is_none() {
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("{} did not exit within 10 s of SIGTERM; its log:\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log lines containing `needle`.
    pub fn log_lines(&self, needle: &str) -> usize {
        self.log_text().lines().filter(|l| l.contains(needle)).count()
    }

    pub fn metrics(&self) -> String {
        http_get(self.http, "/metrics").1
    }

    /// GET /cluster, parsed.
    pub fn cluster_status(&self) -> serde_json::Value {
        let (code, body) = http_get(self.http, "/cluster");
        assert_eq!(code, 200, "/cluster of {}: {body}", self.name);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/cluster of {} is not JSON ({e}): {body}", self.name))
    }

    /// `name`'s entry in this node's /cluster members.
    pub fn member(&self, name: &str) -> Option<serde_json::Value> {
        let s = self.cluster_status();
        s["members"].as_array().expect("members").iter().find(|m| m["name"] == name).cloned()
    }
}

impl Drop for ProcNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits until converged as the topology defines it: for every node X and
/// every other node Y, Y's /cluster has X up at X's own route version.
pub fn converged(nodes: &[&ProcNode], within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let statuses: Vec<serde_json::Value> = nodes.iter().map(|n| n.cluster_status()).collect();
        let ok =
            statuses.iter().enumerate().all(|(i, x)| {
                statuses.iter().enumerate().filter(|(j, _)| *j != i).all(|(_, y)| {
                    y["members"].as_array().expect("members").iter().any(|m| {
                        m["name"] == x["node"] && m["state"] == "up" && m["route_version"] == x["route_version"]
                    })
                })
            });
        if ok {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < within, "cluster did not converge within {within:?}: {statuses:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for `cond` (polled every 50 ms), failing with `what` after `within`.
pub fn until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < within, "{what} (waited {within:?})");
        std::thread::sleep(Duration::from_millis(50));
    }
}
