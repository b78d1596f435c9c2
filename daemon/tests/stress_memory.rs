//! Memory stress on the real host (root): the size becomes resident in the
//! target's memory cgroup without burning CPU, a percentage is taken of the
//! cgroup's limit, and a stress beyond the limit ends in an OOM kill that
//! the driver reports.

#[path = "stress_support.rs"]
mod support;

use std::{fs, thread, time::Duration};

use chaosd::{
    driver::Driver,
    spec::{Fault, MemorySize, StressFault, Target},
    stress::StressDriver,
};
use support::*;

const MIB: u64 = 1 << 20;

fn memory(size: MemorySize, workers: u32, oom_target: bool) -> Fault {
    Fault::Stress(StressFault::Memory { size, workers, oom_target })
}

fn usage(cg: &TestCgroup) -> u64 {
    let file = if cg.v2 { "memory.current" } else { "memory.usage_in_bytes" };
    cg.read("memory", file).trim().parse().unwrap()
}

fn set_limit(cg: &TestCgroup, bytes: u64) {
    if cg.v2 {
        cg.write("memory", "memory.max", &bytes.to_string());
        // No swap in the way of the OOM killer (there is none on the test
        // machines, but a VM or laptop may have some).
        let _ = fs::write(cg.dir("memory").join("memory.swap.max"), "0");
    } else {
        cg.write("memory", "memory.limit_in_bytes", &bytes.to_string());
        let _ = fs::write(cg.dir("memory").join("memory.swappiness"), "0");
    }
}

#[test]
fn the_size_is_resident_in_the_target_cgroup_and_costs_no_cpu_once_touched() {
    require_root();
    let cg = TestCgroup::new("mem");
    let target = Proc::sleeper();
    cg.add(target.pid());
    let driver = StressDriver::new(CHAOSD).unwrap();
    let size = 256 * MIB;
    let exp = experiment("mem-1", path_of(&cg.dir("memory")), memory(MemorySize::Bytes(size), 2, false), None);
    let mut rec = VecRecorder::default();
    let before = usage(&cg);
    driver.apply(&exp, &ctx(&exp), &mut rec).unwrap_or_else(|e| panic!("apply: {e}"));
    let pids = recorded_pids(&rec.0, "stressor");
    assert_eq!(pids.len(), 2);
    for p in &pids {
        assert!(in_cgroup(*p, &cg.name), "stressor {p} not in the test cgroup");
        let adj = fs::read_to_string(format!("/proc/{p}/oom_score_adj")).unwrap();
        assert_eq!(adj.trim(), "1000", "stressors are the OOM killer's first choice by default");
    }
    wait_until("the stressors to hold the size", Duration::from_secs(30), || {
        driver.counters(&exp, &rec.0).stress_resident_bytes >= size
    });
    let charged = usage(&cg) - before;
    println!(
        "resident in stressors: {} MiB, charged to the target cgroup: {} MiB (asked {} MiB)",
        driver.counters(&exp, &rec.0).stress_resident_bytes / MIB,
        charged / MIB,
        size / MIB
    );
    assert!(charged >= size, "the cgroup was charged {charged} bytes, want >= {size}");

    let cpu0 = driver.counters(&exp, &rec.0).stress_cpu_time_ns;
    thread::sleep(Duration::from_secs(2));
    let cpu1 = driver.counters(&exp, &rec.0).stress_cpu_time_ns;
    let burn = (cpu1 - cpu0) as f64 / 2e9;
    println!("stressor CPU while holding: {burn:.4} CPUs");
    assert!(burn < 0.01, "memory stressors burn {burn:.4} CPUs while holding");
    assert!(driver.tick().is_empty());

    driver.revert(&exp, &rec.0).unwrap_or_else(|e| panic!("revert: {e:?}"));
    for p in &pids {
        assert!(!alive(*p), "stressor {p} still running after revert");
    }
    wait_until("the memory to be uncharged", Duration::from_secs(5), || usage(&cg) < before + 16 * MIB);
}

#[test]
fn a_percentage_is_of_the_target_cgroup_limit_and_oom_target_leaves_the_choice_to_the_kernel() {
    require_root();
    let cg = TestCgroup::new("pct");
    set_limit(&cg, 128 * MIB);
    let driver = StressDriver::new(CHAOSD).unwrap();
    let exp = experiment("pct-1", path_of(&cg.dir("memory")), memory(MemorySize::PercentOfLimit(50.0), 1, true), None);
    let mut rec = VecRecorder::default();
    driver.apply(&exp, &ctx(&exp), &mut rec).unwrap_or_else(|e| panic!("apply: {e}"));
    let pid = recorded_pids(&rec.0, "stressor")[0];
    assert_eq!(fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap().trim(), "0");
    wait_until("64 MiB resident", Duration::from_secs(20), || {
        driver.counters(&exp, &rec.0).stress_resident_bytes >= 64 * MIB
    });
    thread::sleep(Duration::from_millis(300));
    let rss = driver.counters(&exp, &rec.0).stress_resident_bytes;
    println!("50% of a 128 MiB limit: {:.1} MiB resident", rss as f64 / MIB as f64);
    assert!(rss < 80 * MIB, "{rss} bytes resident, want about 64 MiB");
    driver.revert(&exp, &rec.0).unwrap();
}

#[test]
fn stress_beyond_the_limit_is_oom_killed_and_reported() {
    require_root();
    let cg = TestCgroup::new("oom");
    set_limit(&cg, 128 * MIB);
    let target = Proc::sleeper();
    cg.add(target.pid());
    let driver = StressDriver::new(CHAOSD).unwrap();
    let exp = experiment("oom-1", Target::Pid(target.pid()), memory(MemorySize::Bytes(200 * MIB), 1, false), None);
    let mut rec = VecRecorder::default();
    driver.apply(&exp, &ctx(&exp), &mut rec).unwrap_or_else(|e| panic!("apply: {e}"));
    let mut reason = None;
    wait_until("the driver to report the OOM kill", Duration::from_secs(30), || {
        for (id, why) in driver.tick() {
            assert_eq!(id, "oom-1");
            reason = Some(why);
        }
        reason.is_some()
    });
    let reason = reason.unwrap();
    println!("tick reported: {reason}");
    assert!(reason.contains("OOM kill"), "reason: {reason}");
    let counters = driver.counters(&exp, &rec.0);
    assert!(counters.oom_kills >= 1, "{counters:?}");
    let events = if cg.v2 { cg.read("memory", "memory.events") } else { cg.read("memory", "memory.oom_control") };
    println!("{}", events.trim().replace('\n', ", "));
    assert!(events.lines().any(|l| l.starts_with("oom_kill ") && l != "oom_kill 0"), "no oom_kill in {events}");
    assert!(alive(target.pid()), "the OOM killer chose the target, not the stressor");
    driver.revert(&exp, &rec.0).unwrap();
}

/// `oom_target`: the stressors get no preference, so the kernel picks by
/// size; here the target holds more than the stress and is the one killed.
/// The OOM kill is counted, the stress goes on, and the target is gone.
#[test]
fn with_oom_target_the_kernel_may_choose_the_target() {
    require_root();
    let cg = TestCgroup::new("oomtarget");
    set_limit(&cg, 128 * MIB);
    // The target: 90 MiB resident, then sleeps.
    let mut target = Proc(
        std::process::Command::new("python3")
            .args(["-c", "import time\nb = bytearray(90 * 1024 * 1024)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('ready', flush=True)\ntime.sleep(600)\n"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("this test needs python3 for its target process: {e}")),
    );
    cg.add(target.pid());
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(target.0.stdout.take().unwrap()), &mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");
    let driver = StressDriver::new(CHAOSD).unwrap();
    let exp = experiment("oomt", Target::Pid(target.pid()), memory(MemorySize::Bytes(60 * MIB), 1, true), None);
    let mut rec = VecRecorder::default();
    driver.apply(&exp, &ctx(&exp), &mut rec).unwrap_or_else(|e| panic!("apply: {e}"));
    let stressor = recorded_pids(&rec.0, "stressor")[0];
    wait_until("the OOM killer to pick the target", Duration::from_secs(20), || !alive(target.pid()));
    let counters = driver.counters(&exp, &rec.0);
    println!("oom_target: target killed, stressor alive: {}, counters {counters:?}", alive(stressor));
    assert!(counters.oom_kills >= 1, "{counters:?}");
    assert!(alive(stressor), "the stressor should have been spared (it is the smaller one)");
    assert!(driver.tick().is_empty(), "the stress itself did not end");
    assert_eq!(driver.liveness(&exp, &rec.0), chaosd::driver::Liveness::Gone);
    driver.revert(&exp, &rec.0).unwrap();
}
