//! `chaosd serve` and `chaosctl` as a user runs them: real binaries, a real
//! socket, real probes. Needs root (CI is root); fails saying so otherwise.

use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (it starts chaosd, which loads BPF and creates namespaces): run `sudo ./scripts/test.sh`");
    }
}

fn chaosd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_chaosd"))
}

fn chaosctl() -> PathBuf {
    let p = chaosd().with_file_name("chaosctl");
    assert!(p.exists(), "{} is missing: build the workspace first (cargo build --workspace)", p.display());
    p
}

/// A daemon on a private socket and state dir, killed and cleaned on drop.
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/chaosd.sock");
        let child = Command::new(chaosd())
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn chaosd");
        let d = Self { child: Some(child), socket, _dir: dir };
        d.wait_for_socket();
        d
    }

    fn wait_for_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("chaosd did not open {} within 20 s", self.socket.display());
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(chaosctl()).arg("--socket").arg(&self.socket).args(args).output().unwrap()
    }

    /// SIGTERM and wait; returns the exit status and stderr.
    fn stop(&mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM).unwrap();
        let out = wait_with_timeout(&mut child, Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status, stderr)
    }
}

fn wait_with_timeout(child: &mut Child, limit: Duration) -> Output {
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
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether `tc` can create netem in a namespace of our own: the truth the
/// daemon's probe must match.
fn netem_really_works() -> bool {
    let ns = format!("chaosd-t-netem-{}", std::process::id());
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    assert!(Command::new("ip").args(["netns", "add", &ns]).status().unwrap().success(), "ip netns add {ns}");
    let _guard = Ns(ns.clone());
    Command::new("ip")
        .args(["netns", "exec", &ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn status_reports_probed_capabilities_and_stop_removes_the_socket() {
    require_root();
    let mut d = Daemon::start();
    let out = d.ctl(&["status", "--output", "json"]);
    assert!(out.status.success(), "chaosctl status failed: {}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["capabilities"]["netem"]["available"], netem_really_works(), "netem probe disagrees with tc: {v}");
    assert_eq!(v["capabilities"]["bpf_prog_load"]["available"], true, "{v}");
    assert!(v["capabilities"]["effective_capabilities"].as_array().unwrap().iter().any(|c| c == "CAP_NET_ADMIN"));
    let table = d.ctl(&["status"]);
    assert!(text(&table.stdout).contains("netem"), "{}", text(&table.stdout));

    let sock = d.socket.clone();
    let (status, stderr) = d.stop();
    assert!(status.success(), "chaosd exited with {status}: {stderr}");
    assert!(!sock.exists(), "socket {} left after SIGTERM", sock.display());
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused() {
    require_root();
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(chaosd())
        .args(["serve", "--socket"])
        .arg(&d.socket)
        .arg("--state-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("another chaosd is already serving"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    // The first daemon still answers.
    assert!(d.ctl(&["status"]).status.success());
}

#[test]
fn a_daemon_without_privileges_names_the_missing_capability() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(chaosd())
        .args(["serve", "--socket"])
        .arg(dir.path().join("s.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("st"))
        .output()
        .expect("setpriv (util-linux) runs chaosd as nobody");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("CAP_NET_ADMIN") && err.contains("sudo chaosd serve"), "{err}");
    assert!(!dir.path().join("s.sock").exists());
}

#[test]
fn chaosctl_without_a_daemon_says_so_in_one_line_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let out = Command::new(chaosctl()).arg("--socket").arg(&sock).arg("status").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(&format!("cannot reach chaosd at {}", sock.display())) && err.contains("sudo chaosd serve"), "{err}");
    // CHAOSD_SOCKET chooses the daemon too.
    let out = Command::new(chaosctl()).env("CHAOSD_SOCKET", &sock).arg("list").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains(&sock.display().to_string()));
}

#[test]
fn unknown_subcommands_are_usage_errors() {
    for bin in [chaosctl(), chaosd()] {
        let out = Command::new(&bin).arg("frobnicate").output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", bin.display());
        assert!(text(&out.stderr).contains("unrecognized subcommand 'frobnicate'"), "{}", text(&out.stderr));
    }
}

