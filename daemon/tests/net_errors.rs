//! Bad input that needs the live system: each is refused with the right
//! error kind and a message naming the problem, and nothing is changed.

mod net_support;

use std::{process::Command, time::Duration};

use chaosd::{
    error::ApiError,
    spec::{Direction, NetAction, Protocol, Target},
};
use net_support::*;

fn pins(td: &TestDriver) -> Vec<String> {
    std::fs::read_dir(&td.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ns-"))
        .collect()
}

fn partition(target: Target, devices: &[&str]) -> chaosd::experiment::Experiment {
    experiment("bad", target, selector(devices, Protocol::Tcp, &[7000], Direction::Both), NetAction::Partition, None)
}

#[test]
fn unknown_netns_and_pid_are_not_found() {
    let td = TestDriver::new(Duration::from_secs(5));
    let err = apply(&td.driver, &partition(Target::NetnsName("chaosd-t-no-such-ns".into()), &[]), &[]).unwrap_err();
    assert!(matches!(err, ApiError::NotFound(_)) && err.to_string().contains("chaosd-t-no-such-ns"), "{err:?}");
    let err = apply(&td.driver, &partition(Target::Pid(u32::MAX - 7), &[]), &[]).unwrap_err();
    assert!(matches!(err, ApiError::NotFound(_)) && err.to_string().contains("pid"), "{err:?}");
    assert!(pins(&td).is_empty());
}

#[test]
fn missing_device_is_not_found_and_names_it() {
    let topo = Topo::new();
    let td = TestDriver::new(Duration::from_secs(5));
    let before = topo.snapshot(&topo.a, "va");
    let err = apply(&td.driver, &partition(Target::NetnsName(topo.a.clone()), &["va", "eth9"]), &[]).unwrap_err();
    assert!(matches!(err, ApiError::NotFound(_)), "{err:?}");
    assert!(err.to_string().contains("eth9") && err.to_string().contains("va"), "{err}");
    assert_eq!(topo.snapshot(&topo.a, "va"), before);
    assert!(pins(&td).is_empty());
}

#[test]
fn ipv4_peer_on_ipv6_only_devices_is_invalid() {
    let topo = Topo::new();
    sh(&format!(
        "ip -n {a} link add v6only type veth peer name v6peer && ip -n {a} link set v6only up && \
         ip -n {a} addr add fd78::1/64 dev v6only nodad",
        a = topo.a
    ));
    let td = TestDriver::new(Duration::from_secs(5));
    let before = topo.snapshot(&topo.a, "v6only");
    let mut sel = selector(&["v6only"], Protocol::All, &[], Direction::Both);
    sel.peers = vec!["10.9.0.0/16".parse().unwrap()];
    let exp = experiment("bad", Target::NetnsName(topo.a.clone()), sel, NetAction::Partition, None);
    let err = apply(&td.driver, &exp, &[]).unwrap_err();
    assert!(matches!(err, ApiError::InvalidArgument(_)) && err.to_string().contains("10.9.0.0/16"), "{err:?}");
    assert_eq!(topo.snapshot(&topo.a, "v6only"), before);
}

#[test]
fn protected_port_as_only_selector_is_invalid() {
    let topo = Topo::new();
    let td = TestDriver::new(Duration::from_secs(5));
    let exp = experiment(
        "bad",
        Target::NetnsName(topo.a.clone()),
        selector(&[], Protocol::Tcp, &[22], Direction::Both),
        NetAction::Partition,
        None,
    );
    let err = apply(&td.driver, &exp, &[]).unwrap_err();
    assert!(matches!(err, ApiError::InvalidArgument(_)) && err.to_string().contains("protected"), "{err:?}");
}

#[test]
fn protected_port_passes_a_partition_of_everything() {
    let topo = Topo::new();
    let td = TestDriver::new(Duration::from_secs(5));
    let _ssh = listen_in(&topo.b, sa(topo.ip_b(false), 22));
    let _other = listen_in(&topo.b, sa(topo.ip_b(false), 2222));
    let exp = experiment(
        "all",
        Target::NetnsName(topo.a.clone()),
        selector(&[], Protocol::All, &[], Direction::Both),
        NetAction::Partition,
        None,
    );
    let objects = apply(&td.driver, &exp, &[]).unwrap_or_else(|e| panic!("apply: {e}"));
    assert!(connects(&topo.a, sa(topo.ip_b(false), 22), Duration::from_secs(1)), "port 22 is protected");
    assert!(!connects(&topo.a, sa(topo.ip_b(false), 2222), Duration::from_millis(500)), "2222 is cut");
    chaosd::driver::Driver::revert(&*td.driver, &exp, &objects).unwrap();
}

#[test]
fn delay_without_netem_fails_clearly_and_changes_nothing() {
    if probe().netem.available {
        // The VM tests cover delay where netem exists.
        println!("this kernel has netem; the no-netem refusal cannot be observed here");
        return;
    }
    let topo = Topo::new();
    let td = TestDriver::new(Duration::from_secs(5));
    let before = topo.snapshot(&topo.a, "va");
    let exp = experiment(
        "delay",
        Target::NetnsName(topo.a.clone()),
        selector(&[], Protocol::Tcp, &[1883], Direction::Both),
        NetAction::Delay {
            latency: Duration::from_millis(100),
            jitter: Duration::ZERO,
            correlation: 0.0,
            distribution: None,
        },
        None,
    );
    let err = apply(&td.driver, &exp, &[]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ApiError::FailedPrecondition(_)), "{err:?}");
    assert!(msg.contains("netem") && msg.contains("loss, partition and bandwidth still work"), "{msg}");
    assert_eq!(topo.snapshot(&topo.a, "va"), before);
    assert!(pins(&td).is_empty());
}

#[test]
fn bandwidth_on_a_device_with_its_own_root_qdisc_is_refused() {
    let topo = Topo::new();
    sh(&format!("ip netns exec {} tc qdisc add dev va root handle 1: tbf rate 10mbit burst 32kb latency 50ms", topo.a));
    let td = TestDriver::new(Duration::from_secs(5));
    let before = topo.snapshot(&topo.a, "va");
    let exp = experiment(
        "bw",
        Target::NetnsName(topo.a.clone()),
        selector(&["va"], Protocol::All, &[], Direction::Egress),
        NetAction::Bandwidth { rate_bps: 1_000_000, burst_bytes: 0 },
        None,
    );
    let err = apply(&td.driver, &exp, &[]).unwrap_err();
    assert!(matches!(err, ApiError::FailedPrecondition(_)) && err.to_string().contains("tbf"), "{err:?}");
    assert_eq!(topo.snapshot(&topo.a, "va"), before);
}

#[test]
fn pid_that_exits_during_injection_is_not_found_and_leaves_nothing() {
    let td = TestDriver::new(Duration::from_secs(5));
    // A process in its own network namespace with one device, living 300 ms.
    let mut child = Command::new("unshare")
        .args(["-n", "sh", "-c", "ip link add d0 type veth peer name d1 && ip link set d0 up && sleep 1.5"])
        .spawn()
        .expect("spawn unshare");
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(50));
    let exp = experiment(
        "pid",
        Target::Pid(pid),
        selector(&["d0"], Protocol::All, &[], Direction::Egress),
        NetAction::Partition,
        None,
    );
    let mut last = None;
    let mut succeeded = 0;
    for _ in 0..400 {
        let t0 = std::time::Instant::now();
        match apply(&td.driver, &exp, &[]) {
            Ok(objects) => {
                succeeded += 1;
                if succeeded <= 3 {
                    println!("apply took {:?}", t0.elapsed());
                }
                chaosd::driver::Driver::revert(&*td.driver, &exp, &objects).unwrap()
            }
            Err(e) => {
                println!("apply: {e:?}");
                last = Some(e);
                break;
            }
        }
    }
    let _ = child.wait();
    assert!(succeeded > 0, "the process never lived long enough to be injected into");
    println!("{succeeded} injections succeeded before the pid exited");
    let err = last.expect("the process exited but injection kept succeeding");
    assert!(matches!(err, ApiError::NotFound(_)), "{err:?}");
    assert!(err.to_string().contains(&pid.to_string()) || err.to_string().contains("namespace"), "{err}");
    assert!(pins(&td).is_empty(), "nothing of chaosd left: {:?}", pins(&td));
}
