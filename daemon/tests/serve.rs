//! `chaosd serve` and `chaosctl` as a user runs them: real binaries, a real
//! socket, real probes. Needs root (CI is root); fails saying so otherwise.

mod common;

use std::process::{Command, Stdio};

use common::{Daemon, chaosctl, chaosd, require_root, text};

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
    assert!(
        err.contains(&format!("cannot reach chaosd at {}", sock.display())) && err.contains("sudo chaosd serve"),
        "{err}"
    );
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
