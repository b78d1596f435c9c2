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
    experiment::Experiment,
    net::bpf,
    netns::NetnsRef,
    spec::{Direction, NetAction, Protocol, Target},
};
use chaosd_common::{DIR_EGRESS, PROTO_TCP};
use net_support::*;

/// Sender and receiver each on their own CPU in every measurement: left to
/// the scheduler, the pair sometimes shares a CPU and sometimes not, which
/// alone moved a measurement by +-20%.
fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).expect("cpu index");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("sched_setaffinity");
}

fn stream_bps(topo: &Topo, port: u16, span: Duration) -> f64 {
    let listener = listen_in(&topo.b, sa(topo.ip_b(false), port));
    let to = sa(topo.ip_b(false), port);
    let sender = NetnsRef::named(&topo.a)
        .run(move || std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)))
        .unwrap()
        .expect("connect");
    let stop = Instant::now() + span + Duration::from_millis(300);
    let writer = thread::spawn(move || {
        pin_to_cpu(0);
        let mut s = sender;
        let buf = vec![0u8; 64 * 1024];
        while Instant::now() < stop {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    pin_to_cpu(1);
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

/// Rules applied through the driver, with their journal objects.
type Installed = Vec<(Experiment, Vec<serde_json::Value>)>;

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
    // Many short rounds: the machine's load changes within seconds, and a
    // round is only useful when a, b and c see the same load.
    let span = Duration::from_millis(600);
    let rounds = 12;
    let ifindex: u32 = sh(&format!("ip netns exec {} cat /sys/class/net/va/ifindex", topo.a)).trim().parse().unwrap();
    let miss = bpf::synth_packet(topo.ip_a(false), topo.ip_b(false), PROTO_TCP, 40000, 7000);
    let hit = bpf::synth_packet(topo.ip_a(false), topo.ip_b(false), 17, 40000, 10_500);
    // Classifier cost per packet through BPF_PROG_TEST_RUN: the median of
    // three runs of 300,000 repetitions each.
    let cost = |pkt: &[u8]| -> u128 {
        let ns_inode: u32 = std::fs::read_dir(&td.dir)
            .unwrap()
            .flatten()
            .find_map(|e| e.file_name().to_str()?.strip_prefix("ns-")?.parse().ok())
            .expect("the namespace's programs are pinned");
        let pin = d.datapath().prog_pin(ns_inode, DIR_EGRESS);
        let pkt = pkt.to_vec();
        let mut runs: Vec<u128> = NetnsRef::named(&topo.a)
            .run(move || {
                let prog = bpf::open_pinned(&pin).unwrap();
                (0..3).map(|_| bpf::test_run(&prog, ifindex, &pkt, 300_000).unwrap().1.as_nanos()).collect()
            })
            .unwrap();
        runs.sort();
        runs[1]
    };
    // Rule 1 is on UDP port 9; rules 2..=1024 on UDP 10000.. (50% loss, so
    // `hit`, UDP to 10500, matches one of them).
    let rule = |i: u16| {
        let (port, action) = if i == 0 {
            (9, NetAction::Partition)
        } else {
            (10_000 + i - 1, NetAction::Loss { percent: 50.0, correlation: 0.0 })
        };
        experiment(
            &format!("bench-{i}"),
            target.clone(),
            selector(&["va"], Protocol::Udp, &[port], Direction::Both),
            action,
            None,
        )
    };
    // Each round measures (a) no classifier, (b) 1 non-matching rule and (c)
    // 1,024 non-matching rules back to back, in the order a-b-c and c-b-a on
    // alternate rounds, so that drift in the machine's load hits all three
    // alike; the ratios are taken within a round.
    let (mut ta, mut tb, mut tc) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cost1, mut cost1024, mut cost_hit) = (Vec::new(), Vec::new(), Vec::new());
    let mut port = 7000u16;
    let mut measure = || {
        port += 1;
        stream_bps(&topo, port, span)
    };
    for r in 0..rounds {
        let mut installed: Installed = Vec::new();
        let install = |installed: &mut Installed, upto: u16| {
            for i in installed.len() as u16..upto {
                let e = rule(i);
                let o = apply(d, &e, &[]).unwrap_or_else(|err| panic!("rule {i}: {err}"));
                installed.push((e, o));
            }
        };
        let uninstall = |installed: &mut Installed, downto: usize| {
            while installed.len() > downto {
                let (e, o) = installed.pop().unwrap();
                d.revert(&e, &o).unwrap();
            }
        };
        if r % 2 == 0 {
            ta.push(measure());
            install(&mut installed, 1);
            tb.push(measure());
            cost1.push(cost(&miss));
            install(&mut installed, 1024);
            tc.push(measure());
            cost1024.push(cost(&miss));
            cost_hit.push(cost(&hit));
            uninstall(&mut installed, 0);
        } else {
            install(&mut installed, 1024);
            tc.push(measure());
            cost1024.push(cost(&miss));
            cost_hit.push(cost(&hit));
            uninstall(&mut installed, 1);
            tb.push(measure());
            cost1.push(cost(&miss));
            uninstall(&mut installed, 0);
            ta.push(measure());
        }
    }
    let target = Target::NetnsName(topo.a.clone());

    // Inject/recover latency with the classifier already loaded in the
    // namespace (the programs stay while any rule is there: one is kept).
    let warm = rule(0);
    let warm_objs = apply(d, &warm, &[]).unwrap();
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
    d.revert(&warm, &warm_objs).unwrap();
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
    // The harness has printed "test ... " without a newline.
    println!();
    let gbit = |v: &[f64]| v.iter().map(|x| (x / 1e8).round() / 10.0).collect::<Vec<_>>();
    let ratios = |x: &[f64]| x.iter().zip(&ta).map(|(x, a)| x / a).collect::<Vec<f64>>();
    let (rb, rc) = (ratios(&tb), ratios(&tc));
    println!("BENCH throughput Gbit/s per round: (a) nothing {:?}", gbit(&ta));
    println!("BENCH throughput Gbit/s per round: (b) 1 rule   {:?}", gbit(&tb));
    println!("BENCH throughput Gbit/s per round: (c) 1024     {:?}", gbit(&tc));
    let show = |v: &[f64]| v.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(" ");
    println!(
        "BENCH throughput ratio b/a (1 non-matching rule): median {:.3} over {rounds} rounds [{}]",
        median(rb.clone()),
        show(&rb)
    );
    println!(
        "BENCH throughput ratio c/a (1,024 non-matching rules): median {:.3} over {rounds} rounds [{}]",
        median(rc.clone()),
        show(&rc)
    );
    let nsl = |v: &[u128]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(" ");
    let med = |v: &[u128]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2]
    };
    println!(
        "BENCH BPF_PROG_TEST_RUN non-matching TCP packet, 1 rule: median {} ns/packet [{}]",
        med(&cost1),
        nsl(&cost1)
    );
    println!(
        "BENCH BPF_PROG_TEST_RUN non-matching TCP packet, 1,024 rules: median {} ns/packet [{}]",
        med(&cost1024),
        nsl(&cost1024)
    );
    println!(
        "BENCH BPF_PROG_TEST_RUN matching packet (50% loss rule among 1,024): median {} ns/packet [{}]",
        med(&cost_hit),
        nsl(&cost_hit)
    );
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
