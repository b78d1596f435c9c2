//! Regression tests for the ways the shipped daemon broke "`chaosctl list`
//! tells the truth" (issue 25, defects 1-5 and 13), each through the real
//! daemon and chaosctl, in namespaces the test creates.

mod common;
mod net_support;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{Daemon, text, wait_until};
use net_support::{Topo, sa, sh, udp_passes};

/// A second `chaosd serve`, started beside the harness's daemon (which
/// holds the harness's one-daemon lock), killed and cleaned on drop.
struct Second {
    child: Option<Child>,
    dir: tempfile::TempDir,
    bpf_dir: PathBuf,
}

impl Second {
    /// Starts `chaosd serve` with `args`; returns it once it says it is
    /// serving (its socket answers earlier: it is bound before the sweep),
    /// or its exit status and log when it refuses to start.
    fn start(args: &[&str]) -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let mut child =
            Command::new(common::chaosd()).arg("serve").args(args).stderr(Stdio::from(log)).spawn().expect("spawn");
        let bpf_dir = args.iter().position(|a| *a == "--bpf-dir").map(|i| PathBuf::from(args[i + 1])).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
                return Err(format!("{status}: {log}"));
            }
            let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
            if log.contains("chaosd serving") {
                return Ok(Self { child: Some(child), dir, bpf_dir });
            }
            assert!(Instant::now() < deadline, "second chaosd did not start within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; returns its log.
    fn stop(mut self) -> String {
        let mut c = self.child.take().unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::SIGTERM).unwrap();
        let status = common::wait_with_timeout(&mut c, Duration::from_secs(20)).status;
        let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
        assert!(status.success(), "second chaosd's clean stop failed: {log}");
        log
    }
}

impl Drop for Second {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.bpf_dir);
    }
}

fn own_dirs(tmp: &Path, tag: &str) -> (String, String, String) {
    (
        tmp.join("s.sock").display().to_string(),
        tmp.join("st").display().to_string(),
        format!("/sys/fs/bpf/chaosd-e2e-second-{tag}-{}", std::process::id()),
    )
}

fn inject(d: &Daemon, args: &[&str]) -> String {
    let mut all = vec!["inject", "network"];
    all.extend(args);
    d.ctl_ok(&all).trim().to_string()
}

fn states(d: &Daemon) -> Vec<(String, String)> {
    d.ctl_json(&["list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["id"].as_str().unwrap().to_string(), e["state"].as_str().unwrap().to_string()))
        .collect()
}

/// What chaosd may have put into a namespace, for before/after comparisons.
fn kernel_view(ns: &str) -> String {
    sh(&format!(
        "ip netns exec {ns} sh -c 'tc qdisc show; for d in $(ls /sys/class/net); do tc class show dev $d; \
         tc filter show dev $d ingress; tc filter show dev $d egress; done; ip -d link show | grep -v \"^ *link/\"'"
    ))
}

#[test]
fn a_second_daemon_with_its_own_dirs_leaves_the_first_ones_faults_alone() {
    common::require_root();
    let topo = Topo::new();
    let a = Daemon::start();
    let b_ip = topo.ip_b(false);
    let ids = [
        inject(&a, &["bandwidth", "--netns", &topo.a, "--port", "7001", "--rate", "8kbit", "--duration", "120s"]),
        inject(
            &a,
            &[
                "bandwidth",
                "--netns",
                &topo.a,
                "--port",
                "7002",
                "--rate",
                "8kbit",
                "--direction",
                "ingress",
                "--duration",
                "120s",
            ],
        ),
        inject(&a, &["partition", "--netns", &topo.a, "--protocol", "udp", "--port", "7000", "--duration", "120s"]),
    ];
    let before = kernel_view(&topo.a);
    assert!(before.contains("c4a0:") && before.contains("chaosd-ifb"), "shaping set up: {before}");

    let tmp = tempfile::tempdir().unwrap();
    let (sock, state, bpf) = own_dirs(tmp.path(), "own");
    let b = Second::start(&["--socket", &sock, "--state-dir", &state, "--bpf-dir", &bpf]).expect("second daemon");
    let b_log = b.stop();
    assert!(!b_log.contains("without a journal entry"), "the second daemon swept something: {b_log}");

    assert_eq!(kernel_view(&topo.a), before, "the second daemon changed the first one's objects");
    assert!(!udp_passes(&topo.a, &topo.b, sa(b_ip, 7000)), "the first daemon's partition no longer drops");
    // The first daemon checks its objects about once a second: give it time
    // to notice anything missing, then it must still list all three active.
    std::thread::sleep(Duration::from_millis(2500));
    let listed = states(&a);
    for id in &ids {
        assert!(listed.contains(&(id.clone(), "active".into())), "{id} not active after the second daemon: {listed:?}");
    }
    a.ctl_ok(&["recover", "--all"]);
}

#[test]
fn a_second_daemon_sharing_a_directory_refuses_to_start_and_changes_nothing() {
    common::require_root();
    let topo = Topo::new();
    let a = Daemon::start();
    let b_ip = topo.ip_b(false);
    let id = inject(&a, &["partition", "--netns", &topo.a, "--protocol", "udp", "--port", "7000"]);
    let tmp = tempfile::tempdir().unwrap();
    let (sock, state, bpf) = own_dirs(tmp.path(), "shared");
    let a_bpf = a.bpf_dir.display().to_string();
    let a_state = a.state_dir.display().to_string();
    let a_sock = a.socket.display().to_string();
    let cases: [(&str, Vec<&str>, &str); 3] = [
        ("the BPF directory", vec!["--socket", &sock, "--state-dir", &state, "--bpf-dir", &a_bpf], "--bpf-dir"),
        ("the state directory", vec!["--socket", &sock, "--state-dir", &a_state, "--bpf-dir", &bpf], "--state-dir"),
        ("the socket", vec!["--socket", &a_sock, "--state-dir", &state, "--bpf-dir", &bpf], "--socket"),
    ];
    for (what, args, hint) in cases {
        match Second::start(&args) {
            Ok(_) => panic!("a second daemon sharing {what} started"),
            Err(e) => {
                assert!(e.contains("another chaosd") && e.contains(hint), "sharing {what}: unclear refusal: {e}");
            }
        }
        assert!(!udp_passes(&topo.a, &topo.b, sa(b_ip, 7000)), "refused start sharing {what} undid the partition");
        assert!(a.bpf_dir.exists(), "refused start sharing {what} removed the first daemon's BPF directory");
        assert_eq!(states(&a), vec![(id.clone(), "active".to_string())]);
    }
    let _ = std::fs::remove_dir_all(&bpf);
}

/// Defects 2-4: chaosd's IFB is never a target, so a fault's direction is
/// what it says, recovery in any order leaves nothing, and several
/// `--direction both` faults coexist.
#[test]
fn chaosds_own_ifb_is_never_a_target_and_directions_hold() {
    common::require_root();
    let topo = Topo::new();
    let clean = kernel_view(&topo.a);
    let a = Daemon::start();
    let (ip_a, ip_b) = (topo.ip_a(false), topo.ip_b(false));
    let shaped =
        inject(&a, &["bandwidth", "--netns", &topo.a, "--port", "9501", "--rate", "100mbit", "--direction", "ingress"]);
    let ifb = sh(&format!("ip -n {} -o link show type ifb", topo.a));
    let ifb_name = ifb.split(':').nth(1).map(|s| s.trim().split('@').next().unwrap().to_string()).expect("an IFB");

    let out = a.ctl(&["inject", "network", "loss", "--netns", &topo.a, "--device", &ifb_name, "--percent", "50"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a fault on chaosd's own IFB must be refused: {err}");
    assert!(err.contains("chaosd's own IFB"), "{err}");

    let part =
        inject(&a, &["partition", "--netns", &topo.a, "--protocol", "udp", "--port", "9501", "--direction", "egress"]);
    for _ in 0..5 {
        assert!(udp_passes(&topo.b, &topo.a, sa(ip_a, 9501)), "ingress to port 9501 dropped by an egress partition");
    }
    let c = &a.ctl_json(&["get", &part])["counters"];
    assert_eq!(c["packets_matched"].as_u64(), Some(0), "the egress partition matched ingress packets: {c}");
    assert!(!udp_passes(&topo.a, &topo.b, sa(ip_b, 9501)), "egress from port 9501 passes an egress partition");

    // Defect 3: recovering in this order used to leave the IFB, the clsact
    // and the redirect filter behind.
    a.ctl_ok(&["recover", &part]);
    let peer = format!("10.77.{}.0/24", topo.n);
    let by_peer = inject(&a, &["bandwidth", "--netns", &topo.a, "--peer", &peer, "--rate", "8kbit"]);
    a.ctl_ok(&["recover", &shaped]);
    a.ctl_ok(&["recover", &by_peer]);
    assert_eq!(kernel_view(&topo.a), clean, "objects left after recovering all three");

    // Defect 4: a second (and third) `--direction both` fault.
    let both: Vec<String> = ["9301", "9302", "9303"]
        .iter()
        .map(|p| inject(&a, &["bandwidth", "--netns", &topo.a, "--port", p, "--rate", "1mbit", "--direction", "both"]))
        .collect();
    let ingress =
        inject(&a, &["bandwidth", "--netns", &topo.a, "--port", "9304", "--rate", "1mbit", "--direction", "ingress"]);
    assert_eq!(sh(&format!("ip -n {} -o link show type ifb", topo.a)).lines().count(), 1, "one IFB, no IFB of an IFB");
    assert_eq!(states(&a).len(), 4);
    for id in both.iter().chain([&ingress]) {
        a.ctl_ok(&["recover", id]);
    }
    assert_eq!(kernel_view(&topo.a), clean, "objects left after the both-direction faults");
}

/// Defect 5: once the dead man's switch fired (the daemon was stopped past
/// the grace period), the fault is over: listed as failed, streamed, and
/// never re-armed by SIGCONT.
#[test]
fn after_sigstop_past_the_grace_period_faults_end_and_are_not_rearmed() {
    common::require_root();
    let topo = Topo::new();
    let d = Daemon::start_with(&["--grace", "2s"]);
    let ip_b = topo.ip_b(false);
    let id = inject(&d, &["partition", "--netns", &topo.a, "--protocol", "udp", "--port", "7000"]);
    let short = inject(&d, &["partition", "--netns", &topo.a, "--protocol", "udp", "--port", "7010"]);
    let mut watch = Command::new(common::chaosctl())
        .arg("--socket")
        .arg(&d.socket)
        .args(["watch", "--output", "json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(d.pid() as i32);

    // A stop shorter than the grace period changes nothing.
    nix::sys::signal::kill(pid, nix::sys::signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    nix::sys::signal::kill(pid, nix::sys::signal::SIGCONT).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(states(&d).len(), 2, "a short stop ended faults");
    assert!(!udp_passes(&topo.a, &topo.b, sa(ip_b, 7000)));
    d.ctl_ok(&["recover", &short]);

    nix::sys::signal::kill(pid, nix::sys::signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    wait_until(Duration::from_secs(4), "traffic passing while chaosd is stopped (switch fired)", || {
        udp_passes(&topo.a, &topo.b, sa(ip_b, 7000))
    });
    while stopped.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(pid, nix::sys::signal::SIGCONT).unwrap();
    wait_until(Duration::from_secs(3), "the experiment listed as ended after SIGCONT", || {
        d.ctl_json(&["get", &id])["state"] == "failed"
    });
    let exp = d.ctl_json(&["get", &id]);
    assert!(exp["reason"].as_str().unwrap().contains("dead man's switch"), "{exp}");
    for _ in 0..4 {
        assert!(udp_passes(&topo.a, &topo.b, sa(ip_b, 7000)), "the partition came back after SIGCONT");
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = watch.kill();
    let out = watch.wait_with_output().unwrap();
    let streamed = text(&out.stdout);
    assert!(
        streamed.lines().any(|l| l.contains(&id) && l.contains("\"failed\"")),
        "no failed event streamed for {id}: {streamed}"
    );
}

/// Defect 5, generally: a fault whose kernel objects someone removed is
/// reported failed, not listed as active.
#[test]
fn a_fault_whose_objects_were_removed_is_reported_failed() {
    common::require_root();
    let topo = Topo::new();
    let clean = kernel_view(&topo.a);
    let d = Daemon::start();
    let id = inject(&d, &["bandwidth", "--netns", &topo.a, "--port", "7001", "--rate", "8kbit"]);
    sh(&format!("ip netns exec {} tc qdisc del dev va root", topo.a));
    wait_until(Duration::from_secs(4), "the experiment reported failed", || {
        d.ctl_json(&["get", &id])["state"] == "failed"
    });
    let exp = d.ctl_json(&["get", &id]);
    assert!(exp["reason"].as_str().unwrap().contains("no longer in force"), "{exp}");
    assert!(states(&d).is_empty());
    assert_eq!(kernel_view(&topo.a), clean, "what was left of the fault was not removed");
}

/// Defect 13: a refusal is not an experiment.
#[test]
fn refused_requests_are_not_journaled() {
    common::require_root();
    let topo = Topo::new();
    let d = Daemon::start();
    for args in [
        vec!["inject", "network", "loss", "--netns", "chaosd-no-such-ns", "--percent", "5"],
        vec!["inject", "network", "partition", "--netns", &topo.a, "--port", "22"],
        vec!["inject", "network", "loss", "--netns", &topo.a, "--device", "nope0", "--percent", "5"],
    ] {
        assert_eq!(d.ctl(&args).status.code(), Some(1), "{args:?} must be refused");
    }
    let first = inject(&d, &["partition", "--netns", &topo.a, "--protocol", "udp", "--port", "7000"]);
    let out = d.ctl(&["inject", "network", "partition", "--netns", &topo.a, "--protocol", "udp", "--port", "7000"]);
    assert!(text(&out.stderr).contains(&first), "a conflict names the other experiment: {}", text(&out.stderr));
    d.ctl_ok(&["recover", &first]);
    let all = d.ctl_json(&["list", "--all"]);
    let ids: Vec<&str> = all.as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![first.as_str()], "list --all shows refusals as experiments: {all}");
}

/// Found by the soak: the classifier of a direction was detached only by
/// the experiment that attached it, so recovering in this order left it
/// attached with no rule, and the next fault there failed to attach.
#[test]
fn the_last_rule_out_of_a_direction_detaches_its_classifier_whoever_attached_it() {
    common::require_root();
    let topo = Topo::new();
    let clean = kernel_view(&topo.a);
    let d = Daemon::start();
    let ip_b = topo.ip_b(false);
    let part = |port: &str, dir: &str| {
        inject(&d, &["partition", "--netns", &topo.a, "--protocol", "udp", "--port", port, "--direction", dir])
    };
    let first = part("7001", "egress");
    let second = part("7002", "egress");
    d.ctl_ok(&["recover", &first]);
    let third = part("7003", "ingress");
    d.ctl_ok(&["recover", &second]);
    let egress_links = || -> Vec<String> {
        walk(&d.bpf_dir).into_iter().filter(|p| p.ends_with("-egress") && p.contains("/link-")).collect()
    };
    assert!(egress_links().is_empty(), "egress classifier left attached with no egress fault: {:?}", egress_links());
    let again = part("7004", "egress");
    assert!(!udp_passes(&topo.a, &topo.b, sa(ip_b, 7004)), "a new egress fault after that does not drop");
    d.ctl_ok(&["recover", &again]);
    d.ctl_ok(&["recover", &third]);
    assert_eq!(kernel_view(&topo.a), clean);
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

/// Found by the soak: with two daemons' classifiers on one device, the
/// first program's "pass" ended the TCX chain, so the other daemon's fault
/// silently stopped acting while it was listed active.
#[test]
fn two_daemons_faults_on_one_device_both_act() {
    common::require_root();
    let topo = Topo::new();
    let a = Daemon::start();
    let ip_b = topo.ip_b(false);
    let first = inject(&a, &["partition", "--netns", &topo.a, "--protocol", "udp", "--port", "7001"]);
    let tmp = tempfile::tempdir().unwrap();
    let (sock, state, bpf) = own_dirs(tmp.path(), "device");
    let b = Second::start(&["--socket", &sock, "--state-dir", &state, "--bpf-dir", &bpf]).expect("second daemon");
    let out = Command::new(common::chaosctl())
        .args(["--socket", &sock, "inject", "network", "partition", "--netns", &topo.a, "--protocol", "udp"])
        .args(["--port", "7002"])
        .output()
        .unwrap();
    assert!(out.status.success(), "second daemon's inject: {}", text(&out.stderr));
    assert!(!udp_passes(&topo.a, &topo.b, sa(ip_b, 7002)), "the second daemon's partition does not drop");
    assert!(!udp_passes(&topo.a, &topo.b, sa(ip_b, 7001)), "the first daemon's partition stopped acting");
    assert!(udp_passes(&topo.a, &topo.b, sa(ip_b, 7003)), "a port neither selects is dropped");
    b.stop();
    assert!(!udp_passes(&topo.a, &topo.b, sa(ip_b, 7001)), "the second daemon's stop undid the first one's fault");
    a.ctl_ok(&["recover", &first]);
}

/// Defect 14: a forced fault saves the user's root qdisc tree and puts it
/// back exactly at recover. (This kernel has no fq_codel: the leaves are
/// pfifo and tbf; the tree module's own tests cover more kinds.)
#[test]
fn a_forced_fault_restores_the_users_qdisc_tree_exactly() {
    common::require_root();
    let topo = Topo::new();
    let ns = &topo.a;
    sh(&format!(
        "ip netns exec {ns} sh -c 'tc qdisc add dev va root handle 1: htb default 20 && \
         tc class add dev va parent 1: classid 1:1 htb rate 100mbit && \
         tc class add dev va parent 1:1 classid 1:10 htb rate 40mbit ceil 100mbit && \
         tc class add dev va parent 1:1 classid 1:20 htb rate 10mbit ceil 50mbit && \
         tc qdisc add dev va parent 1:10 handle 10: pfifo limit 500 && \
         tc qdisc add dev va parent 1:20 handle 20: tbf rate 5mbit burst 32kbit latency 50ms && \
         tc filter add dev va parent 1: protocol ip prio 1 u32 match ip dport 5201 0xffff flowid 1:10'"
    ));
    let tree = || {
        sh(&format!(
            "ip netns exec {ns} sh -c 'tc -d qdisc show dev va; tc -d class show dev va; tc -d filter show dev va'"
        ))
    };
    let before = tree();
    let d = Daemon::start();
    let refused = d.ctl(&["inject", "network", "bandwidth", "--netns", ns, "--port", "7001", "--rate", "1mbit"]);
    assert_eq!(refused.status.code(), Some(1), "a user's root must not be replaced unasked");
    assert_eq!(tree(), before);
    let id = inject(&d, &["bandwidth", "--netns", ns, "--port", "7001", "--rate", "1mbit", "--force"]);
    assert!(tree().contains("c4a0:"), "chaosd's HTB is not in place");
    let second = inject(&d, &["bandwidth", "--netns", ns, "--port", "7002", "--rate", "1mbit"]);
    // The first one out leaves chaosd's HTB to the second; the second one
    // out puts the user's tree back.
    d.ctl_ok(&["recover", &id]);
    assert!(tree().contains("c4a0:"), "chaosd's HTB went while a fault still used it");
    d.ctl_ok(&["recover", &second]);
    assert_eq!(tree(), before, "the user's tree is not back exactly");
}
