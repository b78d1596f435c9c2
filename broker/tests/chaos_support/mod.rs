//! What the chaos tests against a cluster share: chaosd started from this
//! workspace's binaries, the local topology (scripts/cluster-up), a thread
//! inside the hub namespace, and the MQTT workload (workload.rs). Each guard
//! removes what it started, also when a test fails.
#![allow(dead_code, reason = "each test binary uses a different subset")]

mod workload;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
pub use workload::{Sub, Workload};

/// One cluster test at a time: each starts a daemon and three nodes, and two
/// side by side would measure the machine's load rather than the faults.
pub fn serial() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

fn require_root() {
    assert!(
        nix_uid_is_root(),
        "these tests need root (network namespaces, BPF, tc): run them through sudo ./scripts/test.sh"
    );
}

fn nix_uid_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A release binary of this workspace, next to the test's own profile dir.
fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let p = profile.join(name);
    assert!(
        p.is_file(),
        "{} is missing: build it first (cargo build --release -p chaosd -p chaosctl; scripts/test.sh's build phase does)",
        p.display()
    );
    p
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts")
}

/// A chaosd daemon with its own socket, state and BPF directories.
pub struct Chaosd {
    child: Child,
    dir: PathBuf,
    bpf: PathBuf,
    socket: PathBuf,
    ctl: PathBuf,
}

impl Chaosd {
    pub fn start(tag: &str) -> Chaosd {
        require_root();
        let (bin, ctl) = (built("chaosd"), built("chaosctl"));
        let dir = PathBuf::from(format!("/tmp/chaosd-test-{tag}-{}", std::process::id()));
        let bpf = PathBuf::from(format!("/sys/fs/bpf/chaosd-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        let socket = dir.join("chaosd.sock");
        let log = std::fs::File::create(dir.join("chaosd.log")).expect("log file");
        let child = Command::new(bin)
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--bpf-dir")
            .arg(&bpf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn chaosd");
        let mut d = Chaosd { child, dir, bpf, socket, ctl };
        // The socket answers a moment before the daemon has swept and is
        // ready to inject; its log says when it is.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d.log().contains("chaosd serving") {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("chaosd exited ({st}) during start-up:\n{}", d.log());
            }
            assert!(Instant::now() < deadline, "chaosd not serving within 30 s:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("chaosd.log")).unwrap_or_default()
    }

    /// Runs chaosctl against this daemon; its trimmed stdout. A failure
    /// fails the test with chaosctl's own words.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(&self.ctl).arg("--socket").arg(&self.socket).args(args).output().expect("run chaosctl");
        assert!(
            out.status.success(),
            "chaosctl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The fault's kernel counters, as `chaosctl get -o json` shows them.
    pub fn counters(&self, id: &str) -> Value {
        let j: Value = serde_json::from_str(&self.ctl(&["get", id, "-o", "json"])).expect("chaosctl get json");
        j["counters"].clone()
    }
}

impl Drop for Chaosd {
    fn drop(&mut self) {
        // SIGTERM: the daemon recovers every fault it holds before it exits.
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- chaosd.log:\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.bpf);
    }
}

/// The local three-node topology, from scripts/cluster-up.
pub struct Topology {
    run_dir: PathBuf,
    json: Value,
}

impl Topology {
    pub fn up(tag: &str) -> Topology {
        require_root();
        let run_dir = PathBuf::from(format!("/tmp/chaosd-topo-{tag}-{}", std::process::id()));
        let name = format!("{tag}-{}", std::process::id());
        let _ = std::fs::remove_dir_all(&run_dir);
        let out = Command::new(scripts().join("cluster-up"))
            .arg("--run-dir")
            .arg(&run_dir)
            .args(["--name", &name, "--nodes", "3", "--json", "--broker", env!("CARGO_BIN_EXE_broker")])
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/cluster-up");
        assert!(out.status.success(), "scripts/cluster-up failed ({})", out.status);
        let json = serde_json::from_slice(&out.stdout).expect("cluster-up --json output");
        Topology { run_dir, json }
    }

    fn node(&self, i: usize) -> &Value {
        &self.json["nodes"][i - 1]
    }

    pub fn mqtt(&self, i: usize) -> SocketAddr {
        self.node(i)["mqtt"].as_str().and_then(|s| s.parse().ok()).expect("node's mqtt address")
    }

    pub fn http(&self, i: usize) -> SocketAddr {
        self.node(i)["http"].as_str().and_then(|s| s.parse().ok()).expect("node's http address")
    }

    pub fn netns(&self, i: usize) -> String {
        self.node(i)["netns"].as_str().expect("node's netns").to_owned()
    }

    pub fn hub_netns(&self) -> String {
        self.json["hub_netns"].as_str().expect("hub netns").to_owned()
    }

    pub fn pid(&self, i: usize) -> i32 {
        let f = self.node(i)["pid_file"].as_str().expect("pid file");
        std::fs::read_to_string(f).ok().and_then(|s| s.trim().parse().ok()).expect("node's pid")
    }

    pub fn restarts(&self, i: usize) -> u32 {
        let f = self.node(i)["restarts_file"].as_str().expect("restarts file");
        std::fs::read_to_string(f).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }

    /// Node `i`'s /cluster document. Call from inside the hub namespace.
    pub fn view(&self, i: usize) -> Value {
        let (code, body) = crate::common::http_get(self.http(i), "/cluster");
        assert_eq!(code, 200, "GET /cluster on n{i}: {body}");
        serde_json::from_str(&body).expect("/cluster JSON")
    }

    /// The state node `i` sees `peer` in ("up", "suspect", "down").
    pub fn peer_state(&self, i: usize, peer: &str) -> String {
        let v = self.view(i);
        let m = v["members"].as_array().into_iter().flatten().find(|m| m["name"] == peer);
        m.and_then(|m| m["state"].as_str()).unwrap_or("unknown").to_owned()
    }

    /// Every node sees every other one up, at the route version that node
    /// itself is at (what cluster-up waits for). From inside the hub.
    pub fn converged(&self) -> bool {
        let views: Vec<Value> = (1..=3).map(|i| self.view(i)).collect();
        views.iter().all(|v| {
            let members = v["members"].as_array().map(Vec::as_slice).unwrap_or_default();
            members.len() == 2
                && members.iter().all(|m| {
                    let own = views.iter().find(|o| o["node"] == m["name"]);
                    m["state"] == "up" && own.is_some_and(|o| o["route_version"] == m["route_version"])
                })
        })
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.node(i)["log"].as_str().expect("log")).unwrap_or_default()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 1..=3 {
                let log = self.log(i);
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!("--- n{i} broker.log (last lines):");
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        let st =
            Command::new(scripts().join("cluster-down")).arg("--run-dir").arg(&self.run_dir).arg("--purge").status();
        if !matches!(st, Ok(s) if s.success()) {
            eprintln!("scripts/cluster-down --run-dir {} failed: {st:?}", self.run_dir.display());
        }
    }
}

/// Runs `f` on a thread inside network namespace `name` (/run/netns/NAME).
/// Threads and tokio runtimes started by `f` inherit the namespace; a panic
/// in `f` is the caller's panic.
pub fn in_netns<R: Send>(name: &str, f: impl FnOnce() -> R + Send) -> R {
    let path = format!("/run/netns/{name}");
    let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    std::thread::scope(|s| {
        let t = s.spawn(move || {
            // SAFETY: setns on a namespace file we hold open; it changes only
            // this new thread, which never returns to the caller's namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns into {path}: {}", std::io::Error::last_os_error());
            f()
        });
        t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}
