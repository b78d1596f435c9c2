//! Sweep after a restart: stressors that carry chaosd's mark and that no
//! journal entry or live daemon accounts for are killed; those of another
//! live daemon are left alone. Its own test binary: a sweep acts on every
//! stressor of this process that the sweeping driver does not know.

#[path = "stress_support.rs"]
mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use chaosd::{
    driver::Driver,
    spec::{Fault, StressFault, Target},
    stress::StressDriver,
};
use support::*;

fn cpu() -> Fault {
    Fault::Stress(StressFault::Cpu { workers: 2, load_percent: 2 })
}

#[test]
fn sweep_kills_forgotten_stressors_but_not_those_of_a_live_daemon() {
    require_root();
    let cg = TestCgroup::new("sweep");
    // Another live "daemon" (this binary as a helper) with its own stressors.
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sweep_helper", "--nocapture", "--test-threads=1"])
        .env("CHAOSD_TEST_SWEEP_CGROUP", cg.dir("cpuacct"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = helper.stdout.take().unwrap();
    let _helper = Proc(helper);
    let mut others = Vec::new();
    for line in BufReader::new(out).lines() {
        if let Some((_, pids)) = line.unwrap().split_once("PIDS ") {
            others = pids.split_whitespace().map(|p| p.parse::<u32>().unwrap()).collect();
            break;
        }
    }
    assert_eq!(others.len(), 2);

    // Stressors this process started and then forgot (a driver that is
    // still alive but whose journal entry is gone).
    let forgetful = StressDriver::new(CHAOSD).unwrap();
    let exp = experiment("forgotten", Target::Cgroup(cg.dir("cpuacct")), cpu(), None);
    let mut rec = VecRecorder::default();
    forgetful.apply(&exp, &ctx(&exp), &mut rec).unwrap();
    let forgotten = recorded_pids(&rec.0, "stressor");

    let sweeper = StressDriver::new(CHAOSD).unwrap();
    let removed = sweeper.sweep(&[]);
    println!("sweep: {removed:?}");
    assert_eq!(removed.len(), 2, "{removed:?}");
    thread::sleep(Duration::from_millis(200));
    for p in &forgotten {
        assert!(!alive(*p), "forgotten stressor {p} survived the sweep");
    }
    for p in &others {
        assert!(alive(*p), "the sweep killed stressor {p} of another live daemon");
    }
    // Reverting what was swept is not an error.
    forgetful.revert(&exp, &rec.0).unwrap();
}

#[test]
fn sweep_helper() {
    let Ok(cgroup) = std::env::var("CHAOSD_TEST_SWEEP_CGROUP") else { return };
    let driver = StressDriver::new(CHAOSD).unwrap();
    let exp = experiment("other-daemon", Target::Cgroup(cgroup.into()), cpu(), None);
    let mut rec = VecRecorder::default();
    driver.apply(&exp, &ctx(&exp), &mut rec).unwrap();
    println!("PIDS {}", recorded_pids(&rec.0, "stressor").iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" "));
    thread::sleep(Duration::from_secs(30));
}
