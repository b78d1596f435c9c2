//! Loss decided in BPF: the measured loss on the selected UDP port is
//! within half a point of the target over 100,000 datagrams, another port
//! loses nothing, counters agree, and revert leaves the namespace as it was.

mod net_support;

use std::time::Duration;

use chaosd::{
    driver::Driver,
    spec::{Direction, NetAction, Protocol, Target},
};
use net_support::*;

fn loss_case(percent: f64, v6: bool) {
    let topo = Topo::new();
    let td = TestDriver::new(Duration::from_secs(5));
    let d = &td.driver;
    let before = topo.snapshot(&topo.a, "va");
    let exp = experiment(
        &format!("loss-{percent}-{v6}"),
        Target::NetnsName(topo.a.clone()),
        selector(&["va"], Protocol::Udp, &[7000], Direction::Egress),
        NetAction::Loss { percent, correlation: 0.0 },
        Some(Duration::from_secs(120)),
    );
    let objects = apply(d, &exp, &[]).unwrap_or_else(|e| panic!("apply loss: {e}"));
    assert!(topo.snapshot(&topo.a, "va") != before || td.driver.datapath().tcx, "clsact expected on non-TCX kernels");

    const N: u32 = 100_000;
    let counters = || d.counters(&exp, &objects).packets_dropped;
    let got = udp_blast(&topo.a, &topo.b, sa(topo.ip_b(v6), 7000), N, counters);
    let measured = 100.0 * (N - got) as f64 / N as f64;
    println!("loss {percent}% ipv6={v6}: measured {measured:.3}% ({got} of {N} received)");
    assert!((measured - percent).abs() <= 0.5, "measured loss {measured:.3}% is not within 0.5 points of {percent}%");
    let c = d.counters(&exp, &objects);
    assert_eq!(c.packets_matched, N as u64, "every datagram on port 7000 is matched: {c:?}");
    assert_eq!(c.packets_dropped, (N - got) as u64, "counted drops equal the datagrams that did not arrive");

    let other = udp_blast(&topo.a, &topo.b, sa(topo.ip_b(v6), 7001), 10_000, || 0);
    assert_eq!(other, 10_000, "port 7001 must lose nothing");

    d.revert(&exp, &objects).unwrap_or_else(|e| panic!("revert: {e:?}"));
    assert_eq!(topo.snapshot(&topo.a, "va"), before, "namespace differs from its snapshot after revert");
    let ns_pins: Vec<_> = std::fs::read_dir(&td.dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ns-"))
        .collect();
    assert!(ns_pins.is_empty(), "program/link pins left: {ns_pins:?}");
    let after = udp_blast(&topo.a, &topo.b, sa(topo.ip_b(v6), 7000), 2_000, || 0);
    assert_eq!(after, 2_000, "after revert port 7000 loses nothing");
}

#[test]
fn loss_10_percent_ipv4() {
    loss_case(10.0, false);
}

#[test]
fn loss_30_percent_ipv6() {
    loss_case(30.0, true);
}
