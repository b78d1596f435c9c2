//! The dead man's switch and adoption, at driver level: when the heartbeat
//! stops, traffic flows again within grace + 1 s; a driver started again
//! within the grace period adopts a running fault (it stays in force with
//! its deadline), and one started after the grace period refuses to.

mod net_support;

use std::{
    thread,
    time::{Duration, Instant},
};

use chaosd::{
    driver::Driver,
    spec::{Direction, NetAction, Protocol, Target},
};
use net_support::*;

const T: Duration = Duration::from_millis(500);

#[test]
fn heartbeat_expiry_lets_traffic_through_within_grace_plus_one_second() {
    let topo = Topo::new();
    let grace = Duration::from_secs(2);
    let mut td = TestDriver::new(grace);
    let _l = listen_in(&topo.b, sa(topo.ip_b(false), 7400));
    let before = topo.snapshot(&topo.a, "va");
    // 100% loss of everything, no duration.
    let exp = experiment(
        "deadman",
        Target::NetnsName(topo.a.clone()),
        selector(&[], Protocol::All, &[], Direction::Both),
        NetAction::Loss { percent: 100.0, correlation: 0.0 },
        None,
    );
    let objects = apply(&td.driver, &exp, &[]).unwrap_or_else(|e| panic!("apply: {e}"));
    assert!(!connects(&topo.a, sa(topo.ip_b(false), 7400), T), "100% loss blocks");
    thread::sleep(grace + Duration::from_millis(500));
    assert!(!connects(&topo.a, sa(topo.ip_b(false), 7400), T), "still blocked while the heartbeat runs");

    td.stop_heartbeat();
    let stopped = Instant::now();
    let mut flowed = None;
    while stopped.elapsed() < grace + Duration::from_secs(3) {
        if connects(&topo.a, sa(topo.ip_b(false), 7400), Duration::from_millis(200)) {
            flowed = Some(stopped.elapsed());
            break;
        }
    }
    let flowed = flowed.expect("traffic never flowed again after the heartbeat stopped");
    println!("traffic flowed again {flowed:?} after the last heartbeat (grace {grace:?})");
    assert!(flowed <= grace + Duration::from_secs(1), "took {flowed:?}, more than grace + 1 s");
    td.driver.revert(&exp, &objects).unwrap_or_else(|e| panic!("revert: {e:?}"));
    assert_eq!(topo.snapshot(&topo.a, "va"), before);
}

#[test]
fn restarted_driver_adopts_within_grace_and_refuses_after() {
    let topo = Topo::new();
    let grace = Duration::from_secs(3);
    let dir = test_bpffs();
    let _l = listen_in(&topo.b, sa(topo.ip_b(true), 7500));
    let before = topo.snapshot(&topo.a, "va");
    let exp = experiment(
        "adopt",
        Target::NetnsName(topo.a.clone()),
        selector(&[], Protocol::Tcp, &[7500], Direction::Both),
        NetAction::Partition,
        Some(Duration::from_secs(60)),
    );
    let objects = {
        let mut first = TestDriver::on(dir.clone(), grace);
        first.keep_pins = true;
        let o = apply(&first.driver, &exp, &[]).unwrap_or_else(|e| panic!("apply: {e}"));
        assert!(!connects(&topo.a, sa(topo.ip_b(true), 7500), T));
        o
        // `first` is dropped here: its heartbeat stops, pins stay (daemon killed).
    };
    thread::sleep(Duration::from_secs(1));
    let second = TestDriver::on(dir.clone(), grace);
    second.driver.adopt(&exp, &objects).unwrap_or_else(|e| panic!("adopt within grace: {e}"));
    // Well past the first driver's grace period: still in force.
    thread::sleep(grace + Duration::from_secs(1));
    assert!(!connects(&topo.a, sa(topo.ip_b(true), 7500), T), "the adopted fault is still in force");
    let c = second.driver.counters(&exp, &objects);
    assert!(c.packets_dropped > 0, "counters survive the restart: {c:?}");
    second.driver.revert(&exp, &objects).unwrap_or_else(|e| panic!("revert: {e:?}"));
    assert_eq!(topo.snapshot(&topo.a, "va"), before, "namespace equals its snapshot after revert");
    assert!(connects(&topo.a, sa(topo.ip_b(true), 7500), T));
    drop(second);

    // A fault whose daemon stayed away longer than the grace period is not resumed.
    let exp2 = experiment(
        "stale",
        Target::NetnsName(topo.a.clone()),
        selector(&[], Protocol::Tcp, &[7501], Direction::Both),
        NetAction::Partition,
        Some(Duration::from_secs(60)),
    );
    let dir2 = test_bpffs();
    let objects2 = {
        let mut first = TestDriver::on(dir2.clone(), Duration::from_secs(1));
        first.keep_pins = true;
        apply(&first.driver, &exp2, &[]).unwrap_or_else(|e| panic!("apply: {e}"))
    };
    thread::sleep(Duration::from_secs(2));
    let late = TestDriver::on(dir2, Duration::from_secs(1));
    let err = late.driver.adopt(&exp2, &objects2).expect_err("adopt after the grace period must fail");
    assert!(err.to_string().contains("grace"), "{err}");
    late.driver.revert(&exp2, &objects2).unwrap_or_else(|e| panic!("revert: {e:?}"));
    assert_eq!(topo.snapshot(&topo.a, "va"), before);
}
