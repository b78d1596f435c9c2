//! Sweep: a rule whose journal entry is lost (the daemon died between the
//! kernel and the journal) carries chaosd's marks and is removed by the
//! next daemon's sweep, with its links and pins; known rules stay.

mod net_support;

use std::time::Duration;

use chaosd::{
    driver::Driver,
    spec::{Direction, NetAction, Protocol, Target},
};
use net_support::*;

const T: Duration = Duration::from_millis(500);

#[test]
fn sweep_removes_unknown_rules_and_keeps_known_ones() {
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
        apply(&first.driver, &kept, &[lost.clone()]).unwrap_or_else(|e| panic!("apply kept: {e}"))
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
