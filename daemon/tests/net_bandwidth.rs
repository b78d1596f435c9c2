//! Bandwidth as an HTB rate: TCP throughput through a 1 mbit fault is
//! within 15% of the rate, other traffic is not shaped by the default
//! class, and revert restores the qdisc snapshot.

mod net_support;

use std::{
    io::{Read, Write},
    thread,
    time::{Duration, Instant},
};

use chaosd::{
    driver::Driver,
    netns::NetnsRef,
    spec::{Direction, NetAction, Protocol, Target},
};
use net_support::*;

/// Bytes per second a TCP stream from `a` to `b:port` reaches, measured at
/// the receiver after a warm-up of `warm`, over `span`.
fn throughput(topo: &Topo, v6: bool, port: u16, warm: Duration, span: Duration) -> f64 {
    let listener = listen_in(&topo.b, sa(topo.ip_b(v6), port));
    let to = sa(topo.ip_b(v6), port);
    let stop = Instant::now() + warm + span + Duration::from_millis(500);
    let sender = NetnsRef::named(&topo.a)
        .run(move || std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)))
        .unwrap()
        .expect("connect");
    let writer = thread::spawn(move || {
        let mut s = sender;
        s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
        let buf = vec![0u8; 16 * 1024];
        while Instant::now() < stop {
            let _ = s.write(&buf);
        }
    });
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    let mut counted = 0u64;
    let mut t_begin = None;
    while start.elapsed() < warm + span {
        let n = conn.read(&mut buf).unwrap_or(0);
        if start.elapsed() >= warm {
            t_begin.get_or_insert_with(Instant::now);
            counted += n as u64;
        }
    }
    let secs = t_begin.map(|t| t.elapsed().as_secs_f64()).unwrap_or(1.0);
    drop(conn);
    writer.join().unwrap();
    counted as f64 / secs
}

#[test]
fn bandwidth_1mbit_within_15_percent() {
    if !probe().htb.available {
        panic!("this kernel has no HTB qdisc: {}", probe().htb.detail);
    }
    let topo = Topo::new();
    let td = TestDriver::new(Duration::from_secs(5));
    let d = &td.driver;
    let before = topo.snapshot(&topo.a, "va");
    let exp = experiment(
        "bw",
        Target::NetnsName(topo.a.clone()),
        selector(&["va"], Protocol::All, &[], Direction::Egress),
        NetAction::Bandwidth { rate_bps: 1_000_000, burst_bytes: 0 },
        Some(Duration::from_secs(60)),
    );
    let objects = apply(d, &exp, &[]).unwrap_or_else(|e| panic!("apply bandwidth: {e}"));
    let shown = sh(&format!("ip netns exec {} tc qdisc show dev va", topo.a));
    assert!(shown.contains("htb c4a0:"), "{shown}");
    let bps = throughput(&topo, false, 7600, Duration::from_secs(1), Duration::from_secs(4)) * 8.0;
    println!("1mbit fault: measured {:.0} bit/s of TCP payload", bps);
    assert!((bps - 1_000_000.0).abs() <= 150_000.0, "throughput {bps:.0} bit/s is not within 15% of 1 mbit/s");
    let c = d.counters(&exp, &objects);
    assert!(c.packets_delayed > 0, "{c:?}");
    d.revert(&exp, &objects).unwrap_or_else(|e| panic!("revert: {e:?}"));
    assert_eq!(topo.snapshot(&topo.a, "va"), before, "namespace differs from its snapshot after revert");
    let after = throughput(&topo, false, 7601, Duration::from_millis(300), Duration::from_secs(1)) * 8.0;
    println!("after revert: {:.0} bit/s", after);
    assert!(after > 20_000_000.0, "after revert the stream is not shaped any more ({after:.0} bit/s)");
}

#[test]
fn bandwidth_on_one_port_leaves_other_ports_unshaped_ipv6() {
    let topo = Topo::new();
    let td = TestDriver::new(Duration::from_secs(5));
    let d = &td.driver;
    let before = topo.snapshot(&topo.a, "va");
    let exp = experiment(
        "bw-port",
        Target::NetnsName(topo.a.clone()),
        selector(&["va"], Protocol::Tcp, &[7700], Direction::Egress),
        NetAction::Bandwidth { rate_bps: 2_000_000, burst_bytes: 0 },
        None,
    );
    let objects = apply(d, &exp, &[]).unwrap_or_else(|e| panic!("apply: {e}"));
    let shaped = throughput(&topo, true, 7700, Duration::from_secs(1), Duration::from_secs(2)) * 8.0;
    let other = throughput(&topo, true, 7701, Duration::from_millis(300), Duration::from_secs(1)) * 8.0;
    println!("2mbit on port 7700: {shaped:.0} bit/s; port 7701 (default class): {other:.0} bit/s");
    assert!((shaped - 2_000_000.0).abs() <= 300_000.0, "shaped port at {shaped:.0} bit/s");
    assert!(other > 50_000_000.0, "the default class must not shape ({other:.0} bit/s)");
    d.revert(&exp, &objects).unwrap_or_else(|e| panic!("revert: {e:?}"));
    assert_eq!(topo.snapshot(&topo.a, "va"), before);
}

#[test]
fn ingress_bandwidth_goes_through_an_ifb_that_revert_removes() {
    if !probe().ifb.available {
        panic!("this kernel has no IFB devices: {}", probe().ifb.detail);
    }
    let topo = Topo::new();
    let td = TestDriver::new(Duration::from_secs(5));
    let d = &td.driver;
    // Shape what b receives.
    let before = topo.snapshot(&topo.b, "vb");
    let exp = experiment(
        "bw-in",
        Target::NetnsName(topo.b.clone()),
        selector(&["vb"], Protocol::Tcp, &[7800], Direction::Ingress),
        NetAction::Bandwidth { rate_bps: 1_000_000, burst_bytes: 0 },
        None,
    );
    let objects = apply(d, &exp, &[]).unwrap_or_else(|e| panic!("apply: {e}"));
    let links = sh(&format!("ip -n {} link", topo.b));
    assert!(links.contains("chaosd-ifb"), "{links}");
    let bps = throughput(&topo, false, 7800, Duration::from_secs(1), Duration::from_secs(3)) * 8.0;
    println!("ingress 1mbit via IFB: {bps:.0} bit/s");
    assert!((bps - 1_000_000.0).abs() <= 150_000.0, "ingress throughput {bps:.0} bit/s");
    d.revert(&exp, &objects).unwrap_or_else(|e| panic!("revert: {e:?}"));
    assert_eq!(topo.snapshot(&topo.b, "vb"), before, "IFB or qdiscs left behind");
}
