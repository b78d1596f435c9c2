//! Partition decided in BPF: a TCP port is cut while another connects;
//! ingress-only and egress-only cut only their direction; a peer CIDR cuts
//! only that peer; IPv4 and IPv6; revert restores the snapshot.

mod net_support;

use std::time::Duration;

use chaosd::{
    driver::Driver,
    spec::{Direction, NetAction, Protocol, Target},
};
use net_support::*;

const T: Duration = Duration::from_millis(700);

fn partition_tcp_port(v6: bool) {
    let topo = Topo::new();
    let td = TestDriver::new(Duration::from_secs(5));
    let d = &td.driver;
    let _l1 = listen_in(&topo.b, sa(topo.ip_b(v6), 7000));
    let _l2 = listen_in(&topo.b, sa(topo.ip_b(v6), 7001));
    assert!(connects(&topo.a, sa(topo.ip_b(v6), 7000), T), "baseline connect to 7000");
    let before = topo.snapshot(&topo.a, "va");
    let exp = experiment(
        "part-tcp",
        Target::NetnsName(topo.a.clone()),
        selector(&[], Protocol::Tcp, &[7000], Direction::Both),
        NetAction::Partition,
        None,
    );
    let objects = apply(d, &exp, &[]).unwrap_or_else(|e| panic!("apply partition: {e}"));
    assert!(!connects(&topo.a, sa(topo.ip_b(v6), 7000), T), "connect to the partitioned port 7000 must fail");
    assert!(connects(&topo.a, sa(topo.ip_b(v6), 7001), T), "port 7001 must still connect");
    let c = d.counters(&exp, &objects);
    assert!(c.packets_dropped > 0 && c.packets_dropped == c.packets_matched, "{c:?}");
    d.revert(&exp, &objects).unwrap_or_else(|e| panic!("revert: {e:?}"));
    assert_eq!(topo.snapshot(&topo.a, "va"), before, "namespace differs from its snapshot after revert");
    assert!(connects(&topo.a, sa(topo.ip_b(v6), 7000), T), "7000 connects again after revert");
}

#[test]
fn partition_tcp_port_ipv4() {
    partition_tcp_port(false);
}

#[test]
fn partition_tcp_port_ipv6() {
    partition_tcp_port(true);
}

/// UDP both ways through one direction-limited partition in namespace a.
fn one_direction(dir: Direction, v6: bool) {
    let topo = Topo::new();
    let td = TestDriver::new(Duration::from_secs(5));
    let d = &td.driver;
    let before = topo.snapshot(&topo.a, "va");
    let exp = experiment(
        "part-dir",
        Target::NetnsName(topo.a.clone()),
        selector(&["va"], Protocol::Udp, &[7100], dir),
        NetAction::Partition,
        Some(Duration::from_secs(60)),
    );
    let objects = apply(d, &exp, &[]).unwrap_or_else(|e| panic!("apply: {e}"));
    let out = udp_passes(&topo.a, &topo.b, sa(topo.ip_b(v6), 7100));
    let inb = udp_passes(&topo.b, &topo.a, sa(topo.ip_a(v6), 7100));
    match dir {
        Direction::Egress => assert!(!out && inb, "egress-only: out blocked ({out}), in passes ({inb})"),
        Direction::Ingress => assert!(out && !inb, "ingress-only: out passes ({out}), in blocked ({inb})"),
        Direction::Both => unreachable!(),
    }
    d.revert(&exp, &objects).unwrap_or_else(|e| panic!("revert: {e:?}"));
    assert_eq!(topo.snapshot(&topo.a, "va"), before);
}

#[test]
fn partition_egress_only_blocks_only_egress() {
    one_direction(Direction::Egress, false);
    one_direction(Direction::Egress, true);
}

#[test]
fn partition_ingress_only_blocks_only_ingress() {
    one_direction(Direction::Ingress, false);
    one_direction(Direction::Ingress, true);
}

#[test]
fn partition_peer_cidr_blocks_only_that_peer() {
    let topo = Topo::new();
    let td = TestDriver::new(Duration::from_secs(5));
    let d = &td.driver;
    let _l1 = listen_in(&topo.b, sa(topo.ip_b(false), 7200));
    let _l2 = listen_in(&topo.b, sa(topo.ip_b2(), 7200));
    let _l3 = listen_in(&topo.b, sa(topo.ip_b(true), 7200));
    let before = topo.snapshot(&topo.a, "va");
    let mut sel = selector(&[], Protocol::All, &[], Direction::Both);
    sel.peers =
        vec![format!("10.78.{}.0/24", topo.n).parse().unwrap(), format!("fd77:{}::2/128", topo.n).parse().unwrap()];
    let exp = experiment("part-peer", Target::NetnsName(topo.a.clone()), sel, NetAction::Partition, None);
    let objects = apply(d, &exp, &[]).unwrap_or_else(|e| panic!("apply: {e}"));
    assert!(!connects(&topo.a, sa(topo.ip_b2(), 7200), T), "peer 10.78.N.2 is partitioned");
    assert!(!connects(&topo.a, sa(topo.ip_b(true), 7200), T), "peer fd77:N::2 is partitioned");
    assert!(connects(&topo.a, sa(topo.ip_b(false), 7200), T), "peer 10.77.N.2 is not");
    d.revert(&exp, &objects).unwrap_or_else(|e| panic!("revert: {e:?}"));
    assert_eq!(topo.snapshot(&topo.a, "va"), before);
    assert!(connects(&topo.a, sa(topo.ip_b2(), 7200), T));
}

#[test]
fn faults_on_different_ports_coexist_and_overlapping_ones_are_refused() {
    let topo = Topo::new();
    let td = TestDriver::new(Duration::from_secs(5));
    let d = &td.driver;
    let _l1 = listen_in(&topo.b, sa(topo.ip_b(false), 7300));
    let _l2 = listen_in(&topo.b, sa(topo.ip_b(false), 7301));
    let _l3 = listen_in(&topo.b, sa(topo.ip_b(false), 7302));
    let before = topo.snapshot(&topo.a, "va");
    let target = Target::NetnsName(topo.a.clone());
    let e1 = experiment(
        "exp-one",
        target.clone(),
        selector(&[], Protocol::Tcp, &[7300], Direction::Both),
        NetAction::Partition,
        None,
    );
    let e2 = experiment(
        "exp-two",
        target.clone(),
        selector(&[], Protocol::Tcp, &[7301], Direction::Egress),
        NetAction::Partition,
        None,
    );
    let o1 = apply(d, &e1, &[]).unwrap();
    let o2 = apply(d, &e2, std::slice::from_ref(&e1))
        .unwrap_or_else(|e| panic!("a fault on another port must coexist: {e}"));
    let e3 = experiment(
        "exp-three",
        target,
        selector(&["va"], Protocol::All, &[7300], Direction::Egress),
        NetAction::Loss { percent: 50.0, correlation: 0.0 },
        None,
    );
    let err = apply(d, &e3, &[e1.clone(), e2.clone()]).expect_err("overlapping fault must be refused");
    assert!(matches!(err, chaosd::error::ApiError::AlreadyExists(_)), "{err:?}");
    assert!(err.to_string().contains("exp-one"), "the error names the other experiment: {err}");
    assert!(!connects(&topo.a, sa(topo.ip_b(false), 7300), T));
    assert!(!connects(&topo.a, sa(topo.ip_b(false), 7301), T));
    assert!(connects(&topo.a, sa(topo.ip_b(false), 7302), T));
    // Reverting one leaves the other in force.
    d.revert(&e1, &o1).unwrap();
    assert!(connects(&topo.a, sa(topo.ip_b(false), 7300), T));
    assert!(!connects(&topo.a, sa(topo.ip_b(false), 7301), T));
    d.revert(&e2, &o2).unwrap();
    assert_eq!(topo.snapshot(&topo.a, "va"), before);
}

/// A datagram above the MTU (1500 on the veth) leaves in fragments; over
/// IPv6 the first one carries a fragment header before UDP, which the
/// classifier walks past to the ports. Partitioning the port drops the first
/// fragment, so the datagram never arrives, while another port's arrive.
#[test]
fn partition_catches_fragmented_datagrams_ipv4_and_ipv6() {
    for v6 in [false, true] {
        let topo = Topo::new();
        let td = TestDriver::new(Duration::from_secs(5));
        let d = &td.driver;
        let before = topo.snapshot(&topo.a, "va");
        let exp = experiment(
            "part-frag",
            Target::NetnsName(topo.a.clone()),
            selector(&["va"], Protocol::Udp, &[7200], Direction::Egress),
            NetAction::Partition,
            None,
        );
        let big = 4000;
        assert!(udp_passes_sized(&topo.a, &topo.b, sa(topo.ip_b(v6), 7200), big), "baseline (v6 {v6})");
        let objects = apply(d, &exp, &[]).unwrap_or_else(|e| panic!("apply: {e}"));
        assert!(
            !udp_passes_sized(&topo.a, &topo.b, sa(topo.ip_b(v6), 7200), big),
            "a fragmented datagram to the partitioned port arrived (v6 {v6})"
        );
        assert!(udp_passes_sized(&topo.a, &topo.b, sa(topo.ip_b(v6), 7201), big), "port 7201 (v6 {v6})");
        let c = d.counters(&exp, &objects);
        assert!(c.packets_dropped > 0, "{c:?}");
        d.revert(&exp, &objects).unwrap_or_else(|e| panic!("revert: {e:?}"));
        assert_eq!(topo.snapshot(&topo.a, "va"), before);
        assert!(udp_passes_sized(&topo.a, &topo.b, sa(topo.ip_b(v6), 7200), big), "after revert (v6 {v6})");
    }
}
