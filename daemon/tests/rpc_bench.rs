//! Injection latency through the real daemon: the `Inject` RPC returns once
//! the fault is active in the kernel, `Recover` once it is gone; p50/p99
//! over 200 runs each, beside the cost of spawning `tc` for an equivalent
//! minimal set-up, all in one run. Ignored by default; scripts/bench-inject.sh
//! runs it (`cargo test --release -p chaosd --test rpc_bench -- --ignored --nocapture`).

mod common;
mod net_support;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use chaos_proto::chaosd::v1 as pb;
use common::Daemon;
use hyper_util::rt::TokioIo;
use net_support::Topo;
use tokio::net::UnixStream;
use tonic::transport::{Endpoint, Uri};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn line(what: &str, mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let (p50, p99) = (pct(&v, 0.50), pct(&v, 0.99));
    println!("{what:<44} p50 {:>8.3} ms  p99 {:>8.3} ms  (n={})", ms(p50), ms(p99), v.len());
    (p50, p99)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn net_request(ns: &str, port: u32, action: pb::network_action::Kind) -> pb::InjectRequest {
    pb::InjectRequest {
        target: Some(pb::Target { kind: Some(pb::target::Kind::NetnsName(ns.into())) }),
        fault: Some(pb::Fault {
            kind: Some(pb::fault::Kind::Network(pb::NetworkFault {
                selector: Some(pb::Selector {
                    ports: vec![pb::PortRange { first: port, last: port }],
                    protocol: pb::Protocol::Udp as i32,
                    ..Default::default()
                }),
                action: Some(pb::NetworkAction { kind: Some(action) }),
            })),
        }),
        duration: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
        force: false,
    }
}

#[test]
#[ignore = "benchmark: run by scripts/bench-inject.sh"]
fn inject_and_recover_latency() {
    common::require_root();
    let topo = Topo::new();
    let d = Daemon::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let socket = d.socket.clone();
    let mut client = rt.block_on(async move {
        let channel = Endpoint::from_static("http://chaosd.invalid")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let s = socket.clone();
                async move { UnixStream::connect(s).await.map(TokioIo::new) }
            }))
            .await
            .unwrap();
        pb::chaosd_client::ChaosdClient::new(channel)
    });
    const RUNS: usize = 200;
    let has_netem = rt
        .block_on(client.status(pb::StatusRequest {}))
        .unwrap()
        .into_inner()
        .capabilities
        .unwrap()
        .netem
        .unwrap()
        .available;

    let mut kinds: Vec<(&str, pb::network_action::Kind)> = vec![
        ("loss 10%", pb::network_action::Kind::Loss(pb::Loss { percent: 10.0, correlation_percent: 0.0 })),
        ("partition", pb::network_action::Kind::Partition(pb::Partition {})),
    ];
    if has_netem {
        kinds.push((
            "delay 100ms",
            pb::network_action::Kind::Delay(pb::Delay {
                latency: Some(prost_types::Duration { seconds: 0, nanos: 100_000_000 }),
                ..Default::default()
            }),
        ));
    } else {
        println!("(no netem in this kernel: delay inject latency is measured by the VM test instead)");
    }
    println!("chaosd RPC latency, {RUNS} runs each, target netns with one veth:");
    // The floor every RPC pays (HTTP/2 over the unix socket, a blocking
    // thread): List with nothing active.
    let floor: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            rt.block_on(client.list(pb::ListRequest::default())).expect("list");
            t.elapsed()
        })
        .collect();
    line("List, nothing active (the RPC floor)", floor);
    let mut results = Vec::new();
    for (name, kind) in kinds {
        // Another fault stays on port 7001 throughout, so the classifiers
        // stay attached: each measured run is the steady-state map update.
        let warm = rt.block_on(client.inject(net_request(&topo.a, 7001, kind))).unwrap().into_inner();
        let (mut inj, mut rec) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let t = Instant::now();
            let e = rt.block_on(client.inject(net_request(&topo.a, 7000, kind))).expect("inject").into_inner();
            inj.push(t.elapsed());
            let t = Instant::now();
            rt.block_on(client.recover(pb::RecoverRequest { which: Some(pb::recover_request::Which::Id(e.id)) }))
                .expect("recover");
            rec.push(t.elapsed());
        }
        rt.block_on(client.recover(pb::RecoverRequest { which: Some(pb::recover_request::Which::Id(warm.id)) }))
            .unwrap();
        results.push((name, line(&format!("Inject {name} (fault active on return)"), inj)));
        line(&format!("Recover {name} (gone on return)"), rec);
    }
    let mut tc = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        let ok = Command::new("ip")
            .args(["netns", "exec", &topo.a, "tc", "qdisc", "add", "dev", "va", "clsact"])
            .status()
            .unwrap()
            .success()
            && Command::new("ip")
                .args(["netns", "exec", &topo.a, "tc", "qdisc", "del", "dev", "va", "clsact"])
                .status()
                .unwrap()
                .success();
        assert!(ok, "tc clsact add/del failed");
        tc.push(t.elapsed() / 2);
    }
    let (tc50, _) = line("one `ip netns exec .. tc` process (add or del)", tc);
    for (name, (p50, p99)) in results {
        println!(
            "ratio Inject {name} p50 / one tc process: {:.2}; p99 {:.3} ms",
            p50.as_secs_f64() / tc50.as_secs_f64(),
            ms(p99)
        );
    }
}
