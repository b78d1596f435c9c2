//! Shared harness of the daemon's end-to-end tests: a real `chaosd serve` on a
//! private socket and state directory, `chaosctl` as a user runs it, and
//! network namespaces that are removed on drop (also when a test panics).
#![allow(dead_code, reason = "each test binary uses a different part of the harness")]

use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test needs root (it starts chaosd, which loads BPF and creates namespaces): run `sudo ./scripts/test.sh`"
        );
    }
}

pub fn chaosd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_chaosd"))
}

pub fn chaosctl() -> PathBuf {
    let p = chaosd().with_file_name("chaosctl");
    assert!(p.exists(), "{} is missing: build the workspace first (cargo build --workspace)", p.display());
    p
}

/// A daemon on a private socket and state dir, killed and cleaned on drop.
/// The daemon's log, appended to across restarts. Never a pipe: a pipe
/// nobody drains blocks the daemon once it holds 64 KiB of log lines.
fn log_file(dir: &std::path::Path) -> Stdio {
    std::fs::OpenOptions::new().create(true).append(true).open(dir.join("chaosd.log")).expect("open chaosd.log").into()
}

/// One daemon at a time per test binary: a daemon's start-up sweep removes
/// chaosd-marked objects that its own journal does not know, which would
/// include those of a daemon started by a test running in parallel.
static ONE_DAEMON: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub struct Daemon {
    _exclusive: std::sync::MutexGuard<'static, ()>,
    pub state_dir: PathBuf,
    child: Option<Child>,
    pub socket: PathBuf,
    /// Private pin directory on bpffs: never the host's /sys/fs/bpf/chaosd.
    pub bpf_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra `serve` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        let exclusive = ONE_DAEMON.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/chaosd.sock");
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let bpf_dir = PathBuf::from(format!(
            "/sys/fs/bpf/chaosd-e2e-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        let child = Command::new(chaosd())
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--bpf-dir")
            .arg(&bpf_dir)
            .args(extra)
            .stderr(log_file(dir.path()))
            .spawn()
            .expect("spawn chaosd");
        let d = Self {
            bpf_dir,
            _exclusive: exclusive,
            child: Some(child),
            socket,
            state_dir: dir.path().join("state"),
            _dir: dir,
        };
        d.wait_for_socket();
        d
    }

    pub fn wait_for_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("chaosd did not open {} within 20 s", self.socket.display());
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(chaosctl()).arg("--socket").arg(&self.socket).args(args).output().unwrap()
    }

    /// SIGTERM and wait; returns the exit status and stderr.
    pub fn stop(&mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM).unwrap();
        let out = wait_with_timeout(&mut child, Duration::from_secs(20));
        (out.status, self.log())
    }

    /// Everything the daemon logged so far (all its runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.parent().unwrap().join("chaosd.log")).unwrap_or_default()
    }
}

pub fn wait_with_timeout(child: &mut Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process {} did not exit within {limit:?}", child.id());
        }
        thread::sleep(Duration::from_millis(20));
    }
    let mut stderr = Vec::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_end(&mut stderr);
    }
    Output { status: child.wait().unwrap(), stdout: Vec::new(), stderr }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A killed daemon leaves its pins by design (so a restart adopts
        // them); the test must not leave them.
        let _ = std::fs::remove_dir_all(&self.bpf_dir);
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Daemon {
    /// Runs chaosctl and returns stdout, panicking with stderr on failure.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(out.status.success(), "chaosctl {args:?} failed: {}", text(&out.stderr));
        text(&out.stdout)
    }

    /// Runs chaosctl with --output json and parses the answer.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        serde_json::from_str(&self.ctl_ok(&all)).expect("chaosctl JSON")
    }

    /// SIGKILL, as a crash would: nothing of the daemon's own cleanup runs.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a new daemon on the same socket and state directory.
    pub fn restart_after_crash(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "crash() first");
        let child = Command::new(chaosd())
            .args(["serve", "--socket"])
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--bpf-dir")
            .arg(&self.bpf_dir)
            .args(extra)
            .stderr(log_file(self.state_dir.parent().unwrap()))
            .spawn()
            .expect("spawn chaosd");
        self.child = Some(child);
        self.wait_for_socket();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

/// A network namespace made with `ip netns add`, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!("chaosd-t-{tag}-{}", std::process::id());
        let ok = Command::new("ip").args(["netns", "add", &name]).status().expect("ip netns add").success();
        assert!(ok, "ip netns add {name} failed");
        let ns = Self(name);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command in the namespace, panicking on failure.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let out = Command::new("ip").args(["netns", "exec", &self.0]).args(cmd).output().expect("ip netns exec");
        assert!(out.status.success(), "{cmd:?} in {}: {}", self.0, text(&out.stderr));
        text(&out.stdout)
    }

    pub fn spawn(&self, cmd: &[&str]) -> Child {
        Command::new("ip").args(["netns", "exec", &self.0]).args(cmd).spawn().expect("ip netns exec")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Waits until `cond` holds or panics with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}
