//! What a user sees from chaosctl and chaosd in the cases of issue 25 that
//! concern the client and the input: `watch` of an unknown or ended id,
//! stdout closed or full, a process fault that names the requesting
//! chaosctl, values below what the datapath can express, and messages that
//! named the wrong mistake.

mod common;

use std::{
    fs,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{Daemon, Netns, chaosctl, chaosd, require_root, text, wait_until};

/// A child process killed and reaped on drop (also when a test panics).
struct Proc(Option<Child>);

impl Proc {
    fn spawn(cmd: &mut Command) -> Self {
        Self(Some(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn")))
    }

    fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    /// The exit status once it exited, or None while it runs.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.0.as_mut().unwrap().try_wait().unwrap()
    }

    /// Process state letter from /proc/PID/stat (T: stopped).
    fn state(&self) -> char {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        stat.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()).unwrap_or('?')
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// chaosctl's exit status, stdout and stderr, or a panic when it did not
/// finish within `limit` (it is killed first: a hang is the failure).
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn ctl_within(d: &Daemon, args: &[&str], limit: Duration) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Proc(Some(
        Command::new(chaosctl())
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    ));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.exited() {
            break s;
        }
        if Instant::now() > deadline {
            let pid = child.pid();
            let state = child.state();
            drop(child);
            panic!(
                "chaosctl {args:?} (pid {pid}, state {state}) did not finish within {limit:?}; it printed {:?} {:?}",
                fs::read_to_string(&out).unwrap_or_default(),
                fs::read_to_string(&err).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    Ran { status, stdout: fs::read_to_string(&out).unwrap(), stderr: fs::read_to_string(&err).unwrap() }
}

fn sleeper() -> Proc {
    Proc::spawn(Command::new("sleep").arg("600"))
}

/// A sleeping process whose name (comm) is `name`: a copy of sleep(1)
/// under that name.
fn sleeper_named(dir: &Path, name: &str) -> Proc {
    let exe = dir.join(name);
    fs::copy("/bin/sleep", &exe).expect("copy /bin/sleep");
    let p = Proc::spawn(Command::new(&exe).arg("600"));
    let comm = format!("/proc/{}/comm", p.pid());
    wait_until(Duration::from_secs(5), "the copy of sleep to run", || {
        fs::read_to_string(&comm).is_ok_and(|c| c.trim() == name)
    });
    p
}

fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

// ------------------------------------------------------------------ 7: watch

#[test]
fn watch_of_an_unknown_id_is_not_found_at_once() {
    require_root();
    let d = Daemon::start();
    let r = ctl_within(&d, &["watch", "deadbeef"], Duration::from_secs(10));
    assert_eq!(r.status.code(), Some(1), "stderr: {}", r.stderr);
    assert!(r.stderr.contains("no experiment with id 'deadbeef'"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
}

#[test]
fn watch_of_an_ended_id_prints_its_final_state_and_ends() {
    require_root();
    let d = Daemon::start();
    let victim = sleeper();
    // A kill ends as soon as the signal is sent.
    let id = d.ctl_ok(&["inject", "process", "kill", "--pid", &victim.pid().to_string()]).trim().to_string();
    let r = ctl_within(&d, &["watch", &id, "--output", "json"], Duration::from_secs(10));
    assert!(r.status.success(), "{:?}: {}", r.status, r.stderr);
    let events = json_lines(&r.stdout);
    assert_eq!(events.len(), 1, "{}", r.stdout);
    assert_eq!(events[0]["id"], id.as_str());
    assert_eq!(events[0]["state"], "expired");
    assert_eq!(events[0]["event"], "state");
}

#[test]
fn watch_of_an_active_id_ends_when_the_experiment_does() {
    require_root();
    let d = Daemon::start();
    let victim = sleeper();
    let id = d
        .ctl_ok(&["inject", "process", "pause", "--pid", &victim.pid().to_string(), "--duration", "2s"])
        .trim()
        .to_string();
    let r = ctl_within(&d, &["watch", &id, "--output", "json"], Duration::from_secs(15));
    assert!(r.status.success(), "{:?}: {}", r.status, r.stderr);
    let events = json_lines(&r.stdout);
    let states: Vec<&str> =
        events.iter().filter(|e| e["event"] == "state").filter_map(|e| e["state"].as_str()).collect();
    assert_eq!(states.first(), Some(&"active"), "{}", r.stdout);
    assert_eq!(states.last(), Some(&"expired"), "{}", r.stdout);
    assert!(events.iter().all(|e| e["id"] == id.as_str()), "{}", r.stdout);
}

#[test]
fn open_watches_end_when_chaosd_stops_and_do_not_hold_it_off() {
    require_root();
    let mut d = Daemon::start();
    let victim = sleeper();
    let id = d.ctl_ok(&["inject", "process", "pause", "--pid", &victim.pid().to_string()]).trim().to_string();
    let dir = tempfile::tempdir().unwrap();
    let watch = |args: &[&str], tag: &str| {
        Proc(Some(
            Command::new(chaosctl())
                .arg("--socket")
                .arg(&d.socket)
                .args(args)
                .stdout(fs::File::create(dir.path().join(format!("{tag}.out"))).unwrap())
                .stderr(fs::File::create(dir.path().join(format!("{tag}.err"))).unwrap())
                .spawn()
                .unwrap(),
        ))
    };
    let mut one = watch(&["watch", &id], "one");
    let mut all = watch(&["watch"], "all");
    // The watch of one prints its state at once; the other prints counters
    // every second.
    wait_until(Duration::from_secs(10), "both watchers to print", || {
        ["one", "all"].iter().all(|t| fs::metadata(dir.path().join(format!("{t}.out"))).is_ok_and(|m| m.len() > 0))
    });
    let t0 = Instant::now();
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(t0.elapsed() < Duration::from_secs(10), "stopping took {:?}", t0.elapsed());
    for (tag, p) in [("one", &mut one), ("all", &mut all)] {
        wait_until(Duration::from_secs(5), "the watcher to end", || p.exited().is_some());
        let err = fs::read_to_string(dir.path().join(format!("{tag}.err"))).unwrap();
        assert_eq!(p.exited().unwrap().code(), Some(1), "watch {tag}: {err}");
        assert!(err.contains("chaosd is shutting down"), "watch {tag}: {err}");
    }
    assert_ne!(victim.state(), 'T', "the pause was recovered at the stop");
}

// ------------------------------------------------------------ 8: stdout

#[test]
fn a_closed_pipe_ends_quietly() {
    require_root();
    let d = Daemon::start();
    for args in [&["list", "--all"][..], &["status"], &["status", "--output", "json"]] {
        // `chaosctl ... | true`: the reader is gone before chaosctl writes.
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        drop(read_end);
        let out = Command::new(chaosctl())
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert!(err.is_empty(), "chaosctl {args:?} into a closed pipe said: {err}");
        let conventional =
            out.status.success() || out.status.code() == Some(141) || out.status.signal() == Some(libc::SIGPIPE);
        assert!(conventional, "chaosctl {args:?} into a closed pipe: {:?}", out.status);
    }
}

#[test]
fn a_failed_write_is_one_line_and_a_failure() {
    require_root();
    let d = Daemon::start();
    for args in [&["status"][..], &["list", "--all"]] {
        let full = fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let out = Command::new(chaosctl())
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .stdout(Stdio::from(full))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "chaosctl {args:?} > /dev/full: {:?}: {err}", out.status);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains("No space left on device") && !err.contains("panicked"), "{err}");
    }
}

// ----------------------------------------------------- 9: chaosd's clients

#[test]
fn kill_by_name_spares_the_requesting_chaosctl_and_kills_the_others() {
    require_root();
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let mut other = sleeper_named(dir.path(), "chaosctl");
    let r = ctl_within(&d, &["inject", "process", "kill", "--name", "chaosctl"], Duration::from_secs(10));
    assert!(r.status.success(), "the requesting chaosctl ended with {:?}: {}", r.status, r.stderr);
    let id = r.stdout.trim();
    assert!(id.len() == 8 && id.chars().all(|c| c.is_ascii_hexdigit()), "the reply: {:?}", r.stdout);
    assert!(r.stderr.contains("left out pid") && r.stderr.contains("(chaosctl)"), "the reply says so: {}", r.stderr);
    wait_until(Duration::from_secs(5), "the other process named chaosctl to be killed", || other.exited().is_some());
    assert_eq!(other.exited().unwrap().signal(), Some(libc::SIGKILL));
    assert!(d.log().contains("left out processes connected to chaosd"), "the log says so");
}

#[test]
fn pause_by_name_does_not_stop_the_requesting_chaosctl() {
    require_root();
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let other = sleeper_named(dir.path(), "chaosctl");
    let r = ctl_within(&d, &["inject", "process", "pause", "--name", "chaosctl"], Duration::from_secs(10));
    assert!(r.status.success(), "the requesting chaosctl ended with {:?}: {}", r.status, r.stderr);
    wait_until(Duration::from_secs(5), "the other process named chaosctl to be stopped", || other.state() == 'T');
    let recovered = ctl_within(&d, &["recover", r.stdout.trim()], Duration::from_secs(10));
    assert!(recovered.status.success(), "{}", recovered.stderr);
    wait_until(Duration::from_secs(5), "the other process to run again", || other.state() != 'T');
}

#[test]
fn a_connected_client_named_by_pid_is_refused_and_left_alone() {
    require_root();
    let d = Daemon::start();
    // A second client: `chaosctl watch` holds its connection open.
    let mut watch = Proc::spawn(Command::new(chaosctl()).arg("--socket").arg(&d.socket).arg("watch"));
    let fd_dir = format!("/proc/{}/fd", watch.pid());
    wait_until(Duration::from_secs(10), "chaosctl watch to connect", || {
        fs::read_dir(&fd_dir).is_ok_and(|fds| {
            fds.flatten().any(|f| fs::read_link(f.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:")))
        })
    });
    // Connected is not yet registered: give the daemon a moment to accept.
    thread::sleep(Duration::from_millis(500));
    let r = ctl_within(&d, &["inject", "process", "kill", "--pid", &watch.pid().to_string()], Duration::from_secs(10));
    assert_eq!(r.status.code(), Some(1), "{:?}: {} {}", r.status, r.stdout, r.stderr);
    assert!(r.stderr.contains("is connected to chaosd"), "{}", r.stderr);
    thread::sleep(Duration::from_millis(200));
    assert!(watch.exited().is_none(), "the watching chaosctl was killed");
}

// -------------------------------------------- 10: values below the datapath

/// Expects chaosctl to refuse `args` with exit `code`, one line, containing
/// `expect` and none of `not`.
fn refused(d: &Daemon, args: &[&str], code: i32, expect: &str, not: &[&str]) {
    let r = ctl_within(d, args, Duration::from_secs(10));
    assert_eq!(r.status.code(), Some(code), "chaosctl {args:?}: {:?} {} {}", r.status, r.stdout, r.stderr);
    // Usage errors (exit 2) are clap's: the line, then a pointer to --help.
    let lines = r.stderr.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("For more information"));
    assert_eq!(lines.count(), 1, "one line for {args:?}: {}", r.stderr);
    assert!(r.stderr.contains(expect), "chaosctl {args:?}: expected '{expect}' in: {}", r.stderr);
    for n in not {
        assert!(!r.stderr.contains(n), "chaosctl {args:?}: '{n}' in: {}", r.stderr);
    }
}

#[test]
fn shares_and_durations_below_what_the_datapath_expresses_are_refused() {
    require_root();
    let d = Daemon::start();
    let ns = Netns::new("tiny");
    // A device, so that the request is one chaosd would carry out (both
    // ends of the veth live in the namespace and go with it).
    ns.exec(&["ip", "link", "add", "t0", "type", "veth", "peer", "name", "t1"]);
    ns.exec(&["ip", "link", "set", "t0", "up"]);
    let loss = ["inject", "network", "loss", "--netns", ns.0.as_str(), "--port", "7070"];
    let with = |extra: &[&'static str]| -> Vec<&str> { loss.iter().copied().chain(extra.iter().copied()).collect() };
    refused(&d, &with(&["--percent", "1e-300"]), 1, "the smallest share chaosd can apply, 0.0000000233%", &[]);
    refused(&d, &with(&["--percent", "5", "--correlation", "1e-20"]), 1, "0.0000000233", &[]);
    for tiny in ["1ns", "1us", "999us"] {
        refused(&d, &with(&["--percent", "5", "--duration", tiny]), 1, "the smallest duration is 1ms", &[]);
    }
    let listed = d.ctl_json(&["list", "--all"]);
    let _ = d.ctl(&["recover", "--all"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "refused requests left experiments: {listed}");
}

#[test]
fn serve_refuses_protect_port_zero() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let bpf_dir = PathBuf::from(format!("/sys/fs/bpf/chaosd-e2e-port0-{}", std::process::id()));
    struct RemoveDir(PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _bpf = RemoveDir(bpf_dir.clone());
    let socket = dir.path().join("chaosd.sock");
    let log = dir.path().join("log");
    let mut serve = Proc(Some(
        Command::new(chaosd())
            .args(["serve", "--protect-port", "0", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--bpf-dir")
            .arg(&bpf_dir)
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = serve.exited() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "chaosd serve --protect-port 0 is serving: {}",
            fs::read_to_string(&log).unwrap()
        );
        thread::sleep(Duration::from_millis(50));
    };
    let err = fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("'0' is not a port") && err.contains("from 1 to 65535"), "{err}");
    assert!(!socket.exists(), "nothing is set up for a refused start");
}

// ---------------------------------------------------- 11: right messages

#[test]
fn an_absurdly_long_duration_is_too_long_not_negative() {
    require_root();
    let d = Daemon::start();
    let args = ["inject", "network", "loss", "--netns", "n1", "--percent", "5", "--duration", "99999999999999999999h"];
    refused(&d, &args, 2, "too long", &["negative"]);
    let args = ["inject", "network", "loss", "--netns", "n1", "--percent", "5", "--duration", "30d"];
    refused(&d, &args, 1, "at most 7d", &["negative"]);
}

#[test]
fn a_huge_memory_size_is_not_shown_in_millions_of_tib() {
    require_root();
    let d = Daemon::start();
    let args = ["inject", "stress", "memory", "--host", "--size", "99999999999999999999"];
    refused(&d, &args, 2, "more memory than any machine", &["16777216", "TiB"]);
    // 16383 PiB: just below the 16 EiB that u64 bytes can carry.
    let args = ["inject", "stress", "memory", "--host", "--size", "17178820608GiB"];
    refused(&d, &args, 1, "EiB is more than this host's memory", &["TiB"]);
}

#[test]
fn a_namespace_chaosd_may_not_open_is_a_permission_problem_not_an_exited_pid() {
    require_root();
    // A process whose network namespace root may not open: one of another
    // (ancestor) user namespace, as PID 1 of a container host. Where every
    // process is open to root, there is nothing to show.
    let denied =
        fs::read_dir("/proc").unwrap().flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()).find(
            |pid| {
                fs::File::open(format!("/proc/{pid}/ns/net"))
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
            },
        );
    let Some(pid) = denied else {
        // Root holds CAP_SYS_PTRACE here, so no open is denied; the message
        // itself is proven by the unit test of its mapping
        // (net::target::tests::a_permission_denial_is_not_called_an_exited_pid).
        eprintln!("every process's network namespace opens here: the end-to-end case is covered by the unit test");
        return;
    };
    let d = Daemon::start();
    let args = ["inject", "network", "loss", "--pid", &pid.to_string(), "--percent", "5"];
    let pid_s = format!("pid {pid}");
    refused(&d, &args, 1, "permission denied", &["did it exit", "not found"]);
    let r = ctl_within(&d, &args, Duration::from_secs(10));
    assert!(r.stderr.contains(&pid_s) && r.stderr.contains("--netns"), "{}", r.stderr);
}

/// A symbolic link under /sys/fs/cgroup, removed on drop.
struct Link(PathBuf);

impl Drop for Link {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
fn a_symlinked_cgroup_that_is_no_cgroup_is_not_called_missing() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let link = Link(PathBuf::from(format!("/sys/fs/cgroup/chaosd-t-link-{}", std::process::id())));
    if let Err(e) = std::os::unix::fs::symlink(dir.path(), &link.0) {
        // cgroup2 at /sys/fs/cgroup takes no links: nobody can make one.
        eprintln!("cannot make a link under /sys/fs/cgroup here ({e}); nothing to test");
        return;
    }
    let dangling = Link(PathBuf::from(format!("/sys/fs/cgroup/chaosd-t-dangling-{}", std::process::id())));
    std::os::unix::fs::symlink(dir.path().join("gone"), &dangling.0).unwrap();
    let d = Daemon::start();
    let (l, g) = (link.0.to_str().unwrap(), dangling.0.to_str().unwrap());
    let tmp = dir.path().display().to_string();
    refused(&d, &["inject", "stress", "cpu", "--cgroup", l, "--load", "10"], 1, "is not a cgroup", &["does not exist"]);
    refused(&d, &["inject", "process", "pause", "--cgroup", l], 1, "is not a cgroup", &["does not exist"]);
    let r = ctl_within(&d, &["inject", "process", "kill", "--cgroup", l], Duration::from_secs(10));
    assert!(r.stderr.contains(&tmp), "says where the link leads: {}", r.stderr);
    refused(&d, &["inject", "stress", "cpu", "--cgroup", g, "--load", "10"], 1, "is a symbolic link to", &[]);
    refused(&d, &["inject", "process", "pause", "--cgroup", g], 1, "which does not exist", &[]);
}
