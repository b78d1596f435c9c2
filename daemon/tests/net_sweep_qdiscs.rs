//! The start-up sweep of chaosd's kernel objects in network namespaces,
//! through the real daemon: a bandwidth fault in both directions (HTB root
//! on the device, an IFB with its own HTB, chaosd's cls_bpf redirect
//! filter under clsact) is injected, the daemon is SIGKILLed and a new one
//! starts with an empty state directory (the journal is lost) and the same
//! bpffs directory. The new daemon must remove all of it, name each
//! removal in its log, and touch nothing of the user's: an HTB root with
//! another handle, a clsact with the user's own filters (also on the very
//! device chaosd used), other devices. With the journal kept, the sweep
//! leaves the running fault alone.
//!
//! Every test here starts a daemon, so they never overlap (the harness
//! runs one daemon at a time per test binary): a daemon's sweep covers the
//! whole host and would remove another test's objects.

mod common;
mod net_support;

use std::time::Duration;

use common::{Daemon, wait_until};
use net_support::{Topo, sh};

/// A 1 mbit/s limit on `va` of namespace `ns`, egress and ingress.
fn inject_bandwidth_both(d: &Daemon, ns: &str) -> String {
    d.ctl_ok(&[
        "inject",
        "network",
        "bandwidth",
        "--netns",
        ns,
        "--device",
        "va",
        "--rate",
        "1mbit",
        "--direction",
        "both",
        "--duration",
        "10m",
    ])
    .trim()
    .to_string()
}

/// What `tc` shows of chaosd's objects in the namespace right now.
fn assert_fault_in_place(ns: &str) {
    let qdiscs = sh(&format!("ip netns exec {ns} tc qdisc show"));
    assert!(qdiscs.contains("htb c4a0: dev va root"), "chaosd's HTB on va: {qdiscs}");
    assert!(qdiscs.contains("dev chaosd-ifb"), "an IFB with chaosd's HTB: {qdiscs}");
    let filters = sh(&format!("ip netns exec {ns} tc filter show dev va ingress"));
    assert!(filters.contains("chaosd_ifb_sel"), "chaosd's IFB redirect filter on va: {filters}");
}

/// The log lines of the daemon's last run (the log file collects all runs).
fn last_run(log: &str) -> &str {
    log.rfind("probed the host").map(|i| &log[i..]).unwrap_or(log)
}

/// SIGKILL, then a new daemon with an empty state directory (the journal
/// is gone) and the same bpffs directory. Returns once the new daemon
/// answers, which is after its start-up sweep.
fn crash_and_lose_the_journal(d: &mut Daemon, extra: &[&str]) {
    d.crash();
    std::fs::remove_dir_all(&d.state_dir).expect("remove the state directory");
    d.restart_after_crash(extra);
    d.ctl_ok(&["list"]);
}

/// Prints what the sweep removed and how long the namespace sweep took
/// (as the daemon logged it).
fn report_sweep(log: &str) {
    assert!(log.contains("swept network namespaces"), "the daemon did not log its namespace sweep:\n{log}");
    for l in log.lines().filter(|l| l.contains("swept network namespaces") || l.contains("chaosd::net::sweep")) {
        println!("{}", l.trim());
    }
    for l in log.lines().filter(|l| l.contains("removed an object chaosd left")) {
        println!("{}", l.trim());
    }
}

#[test]
fn a_daemon_that_lost_its_journal_removes_the_htb_ifb_and_filters_it_finds() {
    common::require_root();
    let topo = Topo::new();
    let before = topo.snapshot(&topo.a, "va");
    let mut d = Daemon::start();
    inject_bandwidth_both(&d, &topo.a);
    assert_fault_in_place(&topo.a);

    crash_and_lose_the_journal(&mut d, &[]);
    let log = d.log();
    let run = last_run(&log);
    report_sweep(run);
    let after = topo.snapshot(&topo.a, "va");
    // The clsact chaosd added for the IFB filter carries no mark of its
    // creator, so the sweep leaves it (empty) and says so; everything else
    // is as before the fault.
    let clsact = "qdisc clsact ffff: dev va parent ffff:fff1 \n";
    assert!(after.contains(clsact), "expected the emptied clsact to stay:\n{after}");
    assert_eq!(after.replacen(clsact, "", 1), before, "namespace differs from its snapshot after the sweep");
    assert_eq!(sh(&format!("ip netns exec {} tc filter show dev va ingress", topo.a)), "");
    assert!(run.contains("left the clsact qdisc") && run.contains("device=va"), "{run}");
    for what in ["HTB root c4a0: on va", "IFB device chaosd-ifb", "cls_bpf filter chaosd_ifb_sel", "rule "] {
        assert!(
            run.lines()
                .any(|l| l.contains("removed an object chaosd left without a journal entry") && l.contains(what)),
            "the log names the removal of {what}:\n{run}"
        );
    }
    let list = d.ctl_ok(&["list"]);
    assert!(!list.contains("bandwidth"), "the new journal knows nothing: {list}");
}

#[test]
fn the_sweep_leaves_the_users_qdiscs_and_filters_alone() {
    common::require_root();
    let topo = Topo::new();
    let (a, b) = (&topo.a, &topo.b);
    // The user's own: a clsact with a filter on va (the device chaosd
    // shapes), an HTB root 1: and another clsact filter on a second veth
    // pair in a, and an HTB root 1: in b.
    sh(&format!(
        "ip netns exec {a} sh -c 'tc qdisc add dev va clsact && \
           tc filter add dev va ingress prio 10 protocol ip u32 match ip dst 10.99.0.0/16 flowid 1:1 && \
           ip link add ua type veth peer name ub && ip link set ua up && ip link set ub up && \
           tc qdisc add dev ua root handle 1: htb default 10 && \
           tc class add dev ua parent 1: classid 1:10 htb rate 10mbit && \
           tc qdisc add dev ub clsact && \
           tc filter add dev ub egress prio 20 protocol ip u32 match ip dst 10.98.0.0/16 flowid 1:2' && \
         ip netns exec {b} sh -c 'tc qdisc add dev vb root handle 1: htb default 10 && \
           tc class add dev vb parent 1: classid 1:10 htb rate 10mbit'"
    ));
    let users = |ns: &str| {
        sh(&format!(
            "ip netns exec {ns} sh -c 'tc qdisc show; for d in $(ls /sys/class/net); do \
               echo \"== $d\"; tc class show dev $d; tc filter show dev $d ingress; tc filter show dev $d egress; \
             done; ip link'"
        ))
    };
    let (before_a, before_b) = (users(a), users(b));
    let mut d = Daemon::start();
    inject_bandwidth_both(&d, a);
    assert_fault_in_place(a);
    let filters = sh(&format!("ip netns exec {a} tc filter show dev va ingress"));
    assert!(filters.contains("pref 10 u32"), "the user's filter sits beside chaosd's: {filters}");

    crash_and_lose_the_journal(&mut d, &[]);
    let log = d.log();
    let run = last_run(&log);
    report_sweep(run);
    assert_eq!(users(a), before_a, "namespace a differs from its snapshot after the sweep");
    assert_eq!(users(b), before_b, "namespace b differs from its snapshot after the sweep");
    assert!(!run.contains("left the clsact qdisc"), "the clsact on va holds the user's filter: {run}");
    let removals: Vec<&str> =
        run.lines().filter(|l| l.contains("removed an object chaosd left without a journal entry")).collect();
    assert!(removals.iter().any(|l| l.contains("cls_bpf filter chaosd_ifb_sel")), "{run}");
    for l in &removals {
        assert!(!l.contains(" on ua") && !l.contains(" on ub") && !l.contains(" on vb"), "removed the user's: {l}");
    }
}

#[test]
fn with_its_journal_a_restarted_daemon_keeps_the_fault_and_recover_restores_the_namespace() {
    common::require_root();
    let topo = Topo::new();
    let before = topo.snapshot(&topo.a, "va");
    let mut d = Daemon::start_with(&["--grace", "30s"]);
    let id = inject_bandwidth_both(&d, &topo.a);
    d.crash();
    d.restart_after_crash(&["--grace", "30s"]);
    wait_until(Duration::from_secs(10), "the restarted daemon to answer", || d.ctl(&["list"]).status.success());
    let exp = d.ctl_json(&["get", &id]);
    assert_eq!(exp["state"], "active", "{exp}");
    let log = d.log();
    let run = last_run(&log);
    report_sweep(run);
    assert!(!run.contains("removed an object chaosd left without a journal entry"), "{run}");
    assert_fault_in_place(&topo.a);
    d.ctl_ok(&["recover", &id]);
    assert_eq!(topo.snapshot(&topo.a, "va"), before, "namespace differs from its snapshot after recover");
}
