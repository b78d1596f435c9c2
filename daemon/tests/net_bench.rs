//! Benchmarks of the network datapath, side by side in one run (ignored by
//! default; run by scripts/bench-net.sh):
//! - TCP throughput across a veth pair with no classifier, with one
//!   non-matching rule, and with 1,024 non-matching rules (ratios);
//! - the classifier's own cost per packet via BPF_PROG_TEST_RUN;
//! - inject and recover latency (p50/p99 over 200 runs) beside the time
//!   that spawning `tc` for an equivalent filter takes.

mod net_support;

use std::{
    io::{Read, Write},
    thread,
    time::{Duration, Instant},
};

use chaosd::{
    driver::Driver,
    net::bpf,
    netns::NetnsRef,
    spec::{Direction, NetAction, Protocol, Target},
};
use chaosd_common::{DIR_EGRESS, PROTO_TCP};
use net_support::*;

fn stream_bps(topo: &Topo, port: u16, span: Duration) -> f64 {
    let listener = listen_in(&topo.b, sa(topo.ip_b(false), port));
    let to = sa(topo.ip_b(false), port);
    let sender = NetnsRef::named(&topo.a)
        .run(move || std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)))
        .unwrap()
        .expect("connect");
    let stop = Instant::now() + span + Duration::from_millis(300);
    let writer = thread::spawn(move || {
        let mut s = sender;
        let buf = vec![0u8; 64 * 1024];
        while Instant::now() < stop {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let (mut conn, _) = listener.accept().unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    // Warm-up, then count.
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(200) {
        let _ = conn.read(&mut buf);
    }
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < span {
        bytes += conn.read(&mut buf).unwrap_or(0) as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(conn);
    writer.join().unwrap();
    bytes as f64 * 8.0 / secs
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(name: &str, mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let (p50, p99) = (pct(&v, 0.5), pct(&v, 0.99));
    println!("BENCH {name}: n={} p50={:.3} ms p99={:.3} ms", v.len(), p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3);
    (p50, p99)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
#[ignore = "benchmark: run with scripts/bench-net.sh"]
fn bench_network_datapath() {
    let topo = Topo::new();
    let td = TestDriver::new(Duration::from_secs(5));
    let d = &td.driver;
    let target = Target::NetnsName(topo.a.clone());
    let span = Duration::from_millis(1500);
    let rounds = 3;

    // (a) nothing attached and (b) one non-matching rule (the classifier
    // runs on every packet), interleaved so that load from other work on
    // the machine hits both alike.
    let one = experiment(
        "bench-1",
        target.clone(),
        selector(&["va"], Protocol::Udp, &[9], Direction::Both),
        NetAction::Partition,
        None,
    );
    let mut base = Vec::new();
    let mut b1 = Vec::new();
    for r in 0..rounds {
        base.push(stream_bps(&topo, 7000 + r, span));
        let o = apply(d, &one, &[]).unwrap();
        b1.push(stream_bps(&topo, 7100 + r, span));
        d.revert(&one, &o).unwrap();
    }
    let one_objs = apply(d, &one, &[]).unwrap();
    // Classifier cost per packet (non-matching TCP packet), 1 rule.
    let pin = d.datapath().prog_pin(
        std::fs::read_dir(&td.dir)
            .unwrap()
            .flatten()
            .find_map(|e| e.file_name().to_str()?.strip_prefix("ns-")?.parse().ok())
            .unwrap(),
        DIR_EGRESS,
    );
    let ifindex: u32 = sh(&format!("ip netns exec {} cat /sys/class/net/va/ifindex", topo.a)).trim().parse().unwrap();
    let pkt = bpf::synth_packet(topo.ip_a(false), topo.ip_b(false), PROTO_TCP, 40000, 7000);
    let run = |pin: std::path::PathBuf, pkt: Vec<u8>| {
        NetnsRef::named(&topo.a)
            .run(move || bpf::test_run(&bpf::open_pinned(&pin).unwrap(), ifindex, &pkt, 1_000_000).unwrap())
            .unwrap()
    };
    let (_, ns1) = run(pin.clone(), pkt.clone());

    // (c) 1,024 non-matching rules on the same device.
    let mut many = vec![(one.clone(), one_objs)];
    let mut active = vec![one.clone()];
    for i in 0..1023u16 {
        let e = experiment(
            &format!("bench-{i}"),
            target.clone(),
            selector(&["va"], Protocol::Udp, &[10_000 + i], Direction::Both),
            NetAction::Loss { percent: 50.0, correlation: 0.0 },
            None,
        );
        let o = apply(d, &e, &active[active.len().saturating_sub(8)..]).unwrap_or_else(|err| panic!("rule {i}: {err}"));
        active.push(e.clone());
        many.push((e, o));
    }
    let mut b1024 = Vec::new();
    for r in 0..rounds {
        b1024.push(stream_bps(&topo, 7200 + r, span));
    }
    let (_, ns1024) = run(pin.clone(), pkt.clone());
    let hit = bpf::synth_packet(topo.ip_a(false), topo.ip_b(false), 17, 40000, 10_500);
    let (_, ns_hit) = run(pin.clone(), hit);

    // Inject/recover latency with the classifier already loaded in the
    // namespace (the programs stay while any rule is there).
    let mut inject = Vec::new();
    let mut recover = Vec::new();
    for i in 0..200u16 {
        let e = experiment(
            &format!("lat-{i}"),
            target.clone(),
            selector(&["va"], Protocol::Tcp, &[20_000 + i], Direction::Both),
            NetAction::Loss { percent: 10.0, correlation: 0.0 },
            None,
        );
        let t = Instant::now();
        let o = apply(d, &e, &[]).unwrap();
        inject.push(t.elapsed());
        let t = Instant::now();
        d.revert(&e, &o).unwrap();
        recover.push(t.elapsed());
    }
    for (e, o) in many.drain(..) {
        d.revert(&e, &o).unwrap();
    }
    // Cold: first fault in the namespace (programs loaded and verified).
    let mut cold_inject = Vec::new();
    let mut cold_recover = Vec::new();
    for i in 0..10u16 {
        let e = experiment(
            &format!("cold-{i}"),
            target.clone(),
            selector(&["va"], Protocol::Tcp, &[30_000 + i], Direction::Egress),
            NetAction::Partition,
            None,
        );
        let t = Instant::now();
        let o = apply(d, &e, &[]).unwrap();
        cold_inject.push(t.elapsed());
        let t = Instant::now();
        d.revert(&e, &o).unwrap();
        cold_recover.push(t.elapsed());
    }
    // Bandwidth (HTB class) inject/recover, the closest to delay on a
    // kernel without netem.
    let keep = experiment(
        "keep",
        target.clone(),
        selector(&["va"], Protocol::Udp, &[9], Direction::Egress),
        NetAction::Partition,
        None,
    );
    let keep_o = apply(d, &keep, &[]).unwrap();
    let mut bw_inject = Vec::new();
    let mut bw_recover = Vec::new();
    for i in 0..50u16 {
        let e = experiment(
            &format!("bw-{i}"),
            target.clone(),
            selector(&["va"], Protocol::Tcp, &[31_000 + i], Direction::Egress),
            NetAction::Bandwidth { rate_bps: 10_000_000, burst_bytes: 0 },
            None,
        );
        let t = Instant::now();
        let o = apply(d, &e, &[]).unwrap();
        bw_inject.push(t.elapsed());
        let t = Instant::now();
        d.revert(&e, &o).unwrap();
        bw_recover.push(t.elapsed());
    }
    d.revert(&keep, &keep_o).unwrap();
    // Spawning tc for an equivalent filter (add + delete), clsact present.
    sh(&format!("ip netns exec {} tc qdisc add dev va clsact", topo.a));
    let mut tc_add = Vec::new();
    let mut tc_del = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        sh(&format!(
            "ip netns exec {} tc filter add dev va egress prio 7 handle 800::1 u32 match ip dport 7000 0xffff",
            topo.a
        ));
        tc_add.push(t.elapsed());
        let t = Instant::now();
        sh(&format!("ip netns exec {} tc filter del dev va egress prio 7", topo.a));
        tc_del.push(t.elapsed());
    }
    let mut tc_bare = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        std::process::Command::new("tc").arg("-V").output().unwrap();
        tc_bare.push(t.elapsed());
    }
    sh(&format!("ip netns exec {} tc qdisc del dev va clsact", topo.a));
    let mut after = Vec::new();
    for r in 0..rounds {
        after.push(stream_bps(&topo, 7300 + r, span));
    }

    // The harness has printed "test ... " without a newline.
    println!();
    let a = median(base.iter().chain(after.iter()).cloned().collect());
    let (m1, m1024) = (median(b1.clone()), median(b1024.clone()));
    println!(
        "BENCH throughput (a) nothing: {:.2} Gbit/s (rounds {:?} then {:?})",
        a / 1e9,
        base.iter().map(|x| (x / 1e8).round() / 10.0).collect::<Vec<_>>(),
        after.iter().map(|x| (x / 1e8).round() / 10.0).collect::<Vec<_>>()
    );
    println!("BENCH throughput (b) 1 non-matching rule: {:.2} Gbit/s, ratio b/a = {:.3}", m1 / 1e9, m1 / a);
    println!("BENCH throughput (c) 1024 non-matching rules: {:.2} Gbit/s, ratio c/a = {:.3}", m1024 / 1e9, m1024 / a);
    println!(
        "BENCH BPF_PROG_TEST_RUN non-matching TCP packet: 1 rule {} ns/packet, 1024 rules {} ns/packet",
        ns1.as_nanos(),
        ns1024.as_nanos()
    );
    println!("BENCH BPF_PROG_TEST_RUN matching packet (50% loss rule, 1024 rules): {} ns/packet", ns_hit.as_nanos());
    let (i50, _) = summary("inject loss (classifier loaded in the netns)", inject);
    summary("recover loss (classifier stays loaded)", recover);
    summary("inject partition, cold (first fault in the netns: program load + verify + attach)", cold_inject);
    summary("recover partition, last fault (detach + unpin)", cold_recover);
    summary("inject bandwidth (HTB root + class)", bw_inject);
    summary("recover bandwidth", bw_recover);
    let (t50, _) = summary("spawn `ip netns exec tc filter add` (u32 match)", tc_add);
    summary("spawn `ip netns exec tc filter del`", tc_del);
    summary("spawn `tc -V` alone", tc_bare);
    println!("BENCH ratio spawn-tc-add p50 / chaosd inject p50 = {:.1}", t50.as_secs_f64() / i50.as_secs_f64());
}
