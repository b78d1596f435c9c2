//! Sweep: a rule whose journal entry is lost (the daemon died between the
//! kernel and the journal) carries chaosd's marks and is removed by the
//! next daemon's sweep, with its links and pins; known rules stay. On the
//! clsact path (kernels without TCX) the lost rule's cls_bpf filter and
//! HTB class go as well, while the filter and HTB a known rule uses stay.
//!
//! A sweep covers every namespace on the host, so the tests here take
//! turns (`ONE_SWEEPER`): one test's sweep would remove the other's objects.

mod net_support;

use std::{sync::Mutex, time::Duration};

use chaosd::{
    driver::Driver,
    spec::{Direction, NetAction, Protocol, Target},
};
use net_support::*;

const T: Duration = Duration::from_millis(500);

static ONE_SWEEPER: Mutex<()> = Mutex::new(());

#[test]
fn sweep_removes_unknown_rules_and_keeps_known_ones() {
    let _turn = ONE_SWEEPER.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topo::new();
    let dir = test_bpffs();
    let _l1 = listen_in(&topo.b, sa(topo.ip_b(false), 8100));
    let _l2 = listen_in(&topo.b, sa(topo.ip_b(false), 8101));
    let before = topo.snapshot(&topo.a, "va");
    let target = Target::NetnsName(topo.a.clone());
    let lost = experiment(
        "lost",
        target.clone(),
        selector(&[], Protocol::Tcp, &[8100], Direction::Both),
        NetAction::Partition,
        None,
    );
    let kept =
        experiment("kept", target, selector(&[], Protocol::Tcp, &[8101], Direction::Both), NetAction::Partition, None);
    let kept_objects = {
        let mut first = TestDriver::on(dir.clone(), Duration::from_secs(5));
        first.keep_pins = true;
        apply(&first.driver, &lost, &[]).unwrap_or_else(|e| panic!("apply lost: {e}"));
        apply(&first.driver, &kept, std::slice::from_ref(&lost)).unwrap_or_else(|e| panic!("apply kept: {e}"))
    };
    let second = TestDriver::on(dir, Duration::from_secs(5));
    second.driver.adopt(&kept, &kept_objects).unwrap_or_else(|e| panic!("adopt: {e}"));
    let removed = second.driver.sweep(&[(kept.clone(), kept_objects.clone())]);
    println!("swept: {removed:?}");
    assert!(removed.iter().any(|r| r.starts_with("rule ")), "the lost rule is swept: {removed:?}");
    assert!(connects(&topo.a, sa(topo.ip_b(false), 8100), T), "the swept partition is gone");
    assert!(!connects(&topo.a, sa(topo.ip_b(false), 8101), T), "the known partition stays");
    second.driver.revert(&kept, &kept_objects).unwrap_or_else(|e| panic!("revert: {e:?}"));
    assert!(connects(&topo.a, sa(topo.ip_b(false), 8101), T));
    assert_eq!(topo.snapshot(&topo.a, "va"), before);
    let pins: Vec<_> = std::fs::read_dir(&second.dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ns-"))
        .collect();
    assert!(pins.is_empty(), "{pins:?}");
}

#[test]
fn clsact_sweep_removes_a_lost_rules_filter_and_class_and_keeps_what_a_known_rule_uses() {
    let _turn = ONE_SWEEPER.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topo::new();
    let dir = test_bpffs();
    let mut no_tcx = probe();
    no_tcx.tcx.available = false;
    let before = topo.snapshot(&topo.a, "va");
    let target = Target::NetnsName(topo.a.clone());
    let bw = |rate_bps| NetAction::Bandwidth { rate_bps, burst_bytes: 0 };
    // Applied in this order, the lost rules attach both classifiers (and
    // record the Attach objects); the kept one only shares the egress one.
    let lost_in = experiment(
        "lost-in",
        target.clone(),
        selector(&["va"], Protocol::Tcp, &[8200], Direction::Ingress),
        NetAction::Partition,
        None,
    );
    let lost_bw = experiment(
        "lost-bw",
        target.clone(),
        selector(&["va"], Protocol::Tcp, &[8201], Direction::Egress),
        bw(1_000_000),
        None,
    );
    let kept = experiment(
        "kept-bw",
        target,
        selector(&["va"], Protocol::Tcp, &[8202], Direction::Egress),
        bw(2_000_000),
        None,
    );
    let kept_objects = {
        let mut first = TestDriver::with_probe(dir.clone(), Duration::from_secs(5), no_tcx.clone());
        first.keep_pins = true;
        apply(&first.driver, &lost_in, &[]).unwrap_or_else(|e| panic!("apply lost-in: {e}"));
        apply(&first.driver, &lost_bw, std::slice::from_ref(&lost_in)).unwrap_or_else(|e| panic!("apply lost-bw: {e}"));
        apply(&first.driver, &kept, &[lost_in.clone(), lost_bw.clone()]).unwrap_or_else(|e| panic!("apply kept: {e}"))
    };
    let a = &topo.a;
    let classes = || sh(&format!("ip netns exec {a} tc class show dev va"));
    let filters = |side: &str| sh(&format!("ip netns exec {a} tc filter show dev va {side}"));
    assert_eq!(classes().matches("class htb c4a0:").count(), 3, "default + two rule classes: {}", classes());
    assert!(filters("ingress").contains("chaosd_tc"), "{}", filters("ingress"));

    let second = TestDriver::with_probe(dir, Duration::from_secs(5), no_tcx);
    second.driver.adopt(&kept, &kept_objects).unwrap_or_else(|e| panic!("adopt: {e}"));
    let removed = second.driver.sweep(&[(kept.clone(), kept_objects.clone())]);
    println!("swept: {removed:#?}");
    let has = |what: &str| removed.iter().any(|r| r.contains(what) && r.contains(a.as_str()));
    assert!(has("cls_bpf filter chaosd_tc_ingr") && has("on va ingress"), "the lost ingress filter: {removed:?}");
    assert!(has("HTB class c4a0:"), "the lost rule's class: {removed:?}");
    assert!(!has("HTB root") && !has(" on va egress"), "what the kept rule uses stays: {removed:?}");
    assert_eq!(filters("ingress"), "");
    assert!(filters("egress").contains("chaosd_tc"), "the kept rule's classifier: {}", filters("egress"));
    assert_eq!(classes().matches("class htb c4a0:").count(), 2, "default + the kept class: {}", classes());

    // The kept experiment did not attach the classifier, so its revert
    // leaves it: the next start's sweep removes it.
    second.driver.revert(&kept, &kept_objects).unwrap_or_else(|e| panic!("revert: {e:?}"));
    let removed = second.driver.sweep(&[]);
    println!("swept after revert: {removed:#?}");
    // A clsact carries no mark of who made it: the sweep leaves it, empty.
    let clsact = "qdisc clsact ffff: dev va parent ffff:fff1 \n";
    let after = topo.snapshot(a, "va");
    assert_eq!(after.replacen(clsact, "", 1), before, "namespace differs from its snapshot");
}
