//! The clsact path (kernels without TCX, such as the VMs' 6.1): the same
//! faults attached as cls_bpf filters under a clsact qdisc that chaosd
//! creates and removes again, egress and ingress (IFB), with the namespace
//! equal to its snapshot after revert.

mod net_support;

use std::time::Duration;

use chaosd::{
    driver::Driver,
    spec::{Direction, NetAction, Protocol, Target},
};
use net_support::*;

#[test]
fn clsact_partition_and_ingress_shaping_leave_nothing_behind() {
    let topo = Topo::new();
    let td = TestDriver::clsact(Duration::from_secs(5));
    let d = &td.driver;
    let _l = listen_in(&topo.b, sa(topo.ip_b(false), 7900));
    let before = topo.snapshot(&topo.a, "va");
    let part = experiment(
        "cls-part",
        Target::NetnsName(topo.a.clone()),
        selector(&[], Protocol::Tcp, &[7900], Direction::Both),
        NetAction::Partition,
        None,
    );
    let po = apply(d, &part, &[]).unwrap_or_else(|e| panic!("apply partition: {e}"));
    let filters = sh(&format!("ip netns exec {} tc filter show dev va egress", topo.a));
    assert!(filters.contains("chaosd_tc"), "cls_bpf filter expected: {filters}");
    assert!(!connects(&topo.a, sa(topo.ip_b(false), 7900), Duration::from_millis(500)));
    let bw = experiment(
        "cls-bw-in",
        Target::NetnsName(topo.a.clone()),
        selector(&["va"], Protocol::Udp, &[7901], Direction::Ingress),
        NetAction::Bandwidth { rate_bps: 1_000_000, burst_bytes: 0 },
        None,
    );
    let bo = apply(d, &bw, std::slice::from_ref(&part)).unwrap_or_else(|e| panic!("apply ingress bandwidth: {e}"));
    assert!(udp_passes(&topo.b, &topo.a, sa(topo.ip_a(false), 7901)), "shaped ingress still delivers");
    d.revert(&bw, &bo).unwrap_or_else(|e| panic!("revert bandwidth: {e:?}"));
    d.revert(&part, &po).unwrap_or_else(|e| panic!("revert partition: {e:?}"));
    assert_eq!(topo.snapshot(&topo.a, "va"), before, "namespace differs from its snapshot after revert");
    assert!(connects(&topo.a, sa(topo.ip_b(false), 7900), Duration::from_millis(500)));

    // The ingress-only shaping alone (what the VM test does).
    let bo = apply(d, &bw, &[]).unwrap_or_else(|e| panic!("apply ingress bandwidth alone: {e}"));
    d.revert(&bw, &bo).unwrap_or_else(|e| panic!("revert: {e:?}"));
    assert_eq!(topo.snapshot(&topo.a, "va"), before, "after ingress shaping alone");
}
