//! chaosd's faults against a real three-node cluster: the local topology
//! (scripts/cluster-up: one namespace per node, a bridge in a hub
//! namespace), chaosd and chaosctl built from this workspace, faults
//! injected with `chaosctl inject` on node 3's cluster port, and real MQTT
//! clients connected from the hub namespace. Needs root and the release
//! binaries of chaosd and chaosctl (scripts/test.sh's build phase makes
//! them); without them the tests fail and say so.

mod chaos_support;
mod common;

use std::time::{Duration, Instant};

use broker::codec::QoS;
use chaos_support::{Chaosd, Sub, Topology, Workload, in_netns, serial};

/// Publishes QoS `qos` on node 2 at a steady rate to subscribers on nodes 1
/// and 3 while chaosd holds `fault` on node 3's cluster port (7000) for
/// `hold`, then recovers it. Asserts that every message the broker
/// acknowledged reached both subscribers, without QoS 2 duplicates, and
/// returns the time from the heal to full delivery on node 3.
fn cut_cluster_port(tag: &str, fault: &[&str], qos: QoS, hold: Duration) -> Duration {
    let partition = fault[0] == "partition";
    let _one = serial();
    let chaosd = Chaosd::start(tag);
    let topo = Topology::up(tag);
    let (n1, n2, n3) = (topo.mqtt(1), topo.mqtt(2), topo.mqtt(3));
    let node3 = topo.netns(3);
    let hub = topo.hub_netns();
    in_netns(&hub, || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
        rt.block_on(async {
            let topic = format!("chaos/{}", std::process::id());
            let subs = [Sub { addr: n1, persistent: false }, Sub { addr: n3, persistent: false }];
            let mut w = Workload::start(n2, &subs, &topic, qos, 200.0).await;
            tokio::time::sleep(Duration::from_secs(3)).await;

            let mut args = vec!["inject", "network"];
            args.extend_from_slice(fault);
            let safety = format!("{}s", hold.as_secs() + 30);
            args.extend_from_slice(&[
                "--netns",
                &node3,
                "--port",
                "7000",
                "--direction",
                "both",
                "--duration",
                &safety,
            ]);
            let id = chaosd.ctl(&args);
            let injected = Instant::now();
            eprintln!("{tag}: injected {} as {id}", fault.join(" "));
            tokio::time::sleep(hold.saturating_sub(injected.elapsed())).await;
            if partition {
                let seen = topo.peer_state(2, "n3");
                assert_ne!(seen, "up", "node 2 still sees node 3 up at the end of a {hold:?} partition");
            }
            let counters = chaosd.counters(&id);
            chaosd.ctl(&["recover", &id]);
            let heal = Instant::now();
            eprintln!("{tag}: recovered after {:.1}s; counters {counters}", injected.elapsed().as_secs_f64());
            assert!(
                counters["packets_dropped"].as_u64().unwrap_or(0) > 0,
                "the fault dropped no packet, so this run proves nothing: {counters}"
            );

            while !topo.converged() {
                assert!(
                    heal.elapsed() < Duration::from_secs(30),
                    "the cluster did not reconverge within 30 s of the heal"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            eprintln!("{tag}: members up and routes converged {:.2}s after the heal", heal.elapsed().as_secs_f64());
            tokio::time::sleep(Duration::from_secs(5).saturating_sub(heal.elapsed())).await;
            let report = w.finish(Duration::from_secs(40)).await;
            eprintln!("{tag}: {report}");
            assert!(report.sent_during(injected, heal) > 0, "nothing was published during the fault: {report}");
            for (i, s) in report.subscribers.iter().enumerate() {
                assert_eq!(s.lost, 0, "subscriber {i} lost acknowledged messages: {report}");
                if qos == QoS::ExactlyOnce {
                    assert_eq!(s.duplicates, 0, "subscriber {i} got QoS 2 duplicates: {report}");
                }
            }
            let full = report.full_delivery(1, heal, heal);
            eprintln!("{tag}: heal -> full delivery on node 3: {:.2}s", full.as_secs_f64());
            full
        })
    })
}

/// A 20 s partition of node 3's cluster port, cut both ways by chaosd:
/// no acknowledged QoS 1 message is lost, and node 3's subscriber has them
/// all soon after the heal (the target is 5 s).
#[test]
fn partition_of_a_cluster_port_loses_no_acknowledged_qos1_message() {
    let full = cut_cluster_port("cc-part", &["partition"], QoS::AtLeastOnce, Duration::from_secs(20));
    assert!(full < Duration::from_secs(30), "full delivery took {full:?} after the heal (the seed plan allows 30 s)");
}

/// 30% loss on node 3's cluster port for 20 s: nothing acknowledged is
/// lost and QoS 2 is delivered exactly once.
#[test]
fn loss_on_a_cluster_port_loses_nothing_and_duplicates_no_qos2_message() {
    cut_cluster_port("cc-loss", &["loss", "--percent", "30"], QoS::ExactlyOnce, Duration::from_secs(20));
}

/// `kill -9` of node 3 (through chaosd) while QoS 1 is published on node 2:
/// the topology restarts it, and its persistent-session subscriber, back on
/// node 3, gets every acknowledged message: what node 3 had stored and what
/// node 2 queued for it while it was gone.
#[test]
fn killed_node_gets_its_persistent_sessions_and_queued_forwards_back() {
    let _one = serial();
    let chaosd = Chaosd::start("cc-kill");
    let topo = Topology::up("cc-kill");
    let (n1, n2, n3) = (topo.mqtt(1), topo.mqtt(2), topo.mqtt(3));
    let hub = topo.hub_netns();
    in_netns(&hub, || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
        rt.block_on(async {
            let topic = format!("chaos/{}", std::process::id());
            let subs = [Sub { addr: n1, persistent: false }, Sub { addr: n3, persistent: true }];
            let mut w = Workload::start(n2, &subs, &topic, QoS::AtLeastOnce, 200.0).await;
            tokio::time::sleep(Duration::from_secs(3)).await;

            let victim = topo.pid(3);
            let id = chaosd.ctl(&["inject", "process", "kill", "--pid", &victim.to_string()]);
            let killed = Instant::now();
            eprintln!("cc-kill: killed node 3 (pid {victim}) as {id}");
            while topo.restarts(3) == 0 || topo.pid(3) == victim {
                assert!(killed.elapsed() < Duration::from_secs(30), "the topology did not restart node 3 within 30 s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let back = Instant::now();
            eprintln!("cc-kill: node 3 restarted as pid {} after {:.1}s", topo.pid(3), killed.elapsed().as_secs_f64());

            tokio::time::sleep(Duration::from_secs(8)).await;
            let report = w.finish(Duration::from_secs(40)).await;
            eprintln!("cc-kill: {report}");
            assert!(report.subscribers[1].reconnects >= 1, "node 3's subscriber never lost its connection: {report}");
            for (i, s) in report.subscribers.iter().enumerate() {
                assert_eq!(s.lost, 0, "subscriber {i} lost acknowledged messages: {report}");
            }
            let full = report.full_delivery(1, back, killed);
            eprintln!(
                "cc-kill: kill -> node 3's subscriber has all acknowledged by its restart: {:.2}s",
                full.as_secs_f64()
            );
        });
    });
}
