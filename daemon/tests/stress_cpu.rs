//! CPU stress on the real host (root): stressors land in the target's
//! cgroup before they burn, hold the asked load there, and are gone after
//! revert and when their parent dies.

#[path = "stress_support.rs"]
mod support;

use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use chaosd::{
    driver::Driver,
    spec::{Fault, StressFault, Target},
    stress::StressDriver,
};
use support::*;

fn cpu(workers: u32, load_percent: u32) -> Fault {
    Fault::Stress(StressFault::Cpu { workers, load_percent })
}

/// `--workers 2 --load 50` adds 1.0 CPU (±0.15) to the target's cgroup
/// accounting; after revert no stressor remains and usage stops rising.
#[test]
fn two_workers_at_half_load_add_one_cpu_to_the_target_cgroup() {
    require_root();
    let cg = TestCgroup::new("cpu");
    cg.favour_cpu();
    let target = Proc::sleeper();
    cg.add(target.pid());
    let driver = StressDriver::new(CHAOSD).unwrap();
    let exp = experiment("cpu-1", Target::Pid(target.pid()), cpu(2, 50), Some(Duration::from_secs(60)));
    let mut rec = VecRecorder::default();
    driver.apply(&exp, &ctx(&exp), &mut rec).unwrap_or_else(|e| panic!("apply: {e}"));

    // Journal order: each stressor's intent before the stressor itself.
    let kinds: Vec<&str> = rec.0.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["stressor-intent", "stressor", "stressor-intent", "stressor"], "{:?}", rec.0);
    let pids = recorded_pids(&rec.0, "stressor");
    for p in &pids {
        assert!(alive(*p), "stressor {p} is not running");
        assert!(in_cgroup(*p, &cg.name), "stressor {p} is not in {}", cg.name);
        // Exec'd with SECBIT_NOROOT: no capabilities at all.
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap();
        assert!(status.lines().any(|l| l == "CapPrm:\t0000000000000000"), "stressor {p} holds capabilities:\n{status}");
    }

    // Let the duty cycle settle, then measure the cgroup's own accounting.
    thread::sleep(Duration::from_millis(500));
    let (u0, t0) = (cg.cpu_usage_ns(), Instant::now());
    thread::sleep(Duration::from_secs(5));
    let (u1, t1) = (cg.cpu_usage_ns(), Instant::now());
    let cpus = (u1 - u0) as f64 / (t1 - t0).as_nanos() as f64;
    println!("target cgroup usage with 2 workers at 50%: {cpus:.3} CPUs over {:.2} s", (t1 - t0).as_secs_f64());
    let counters = driver.counters(&exp, &rec.0);
    println!("stressor CPU time counter: {:.3} s", counters.stress_cpu_time_ns as f64 / 1e9);
    assert!((cpus - 1.0).abs() <= 0.15, "usage {cpus:.3} CPUs, want 1.0 ± 0.15");
    assert!(counters.stress_cpu_time_ns > 4_000_000_000, "stressor CPU time counter {counters:?}");
    assert!(driver.tick().is_empty(), "no stressor should have ended");

    driver.revert(&exp, &rec.0).unwrap_or_else(|e| panic!("revert: {e:?}"));
    for p in &pids {
        assert!(!alive(*p), "stressor {p} still running after revert");
    }
    assert_eq!(cg.procs(), [target.pid()], "only the target should be left in the cgroup");
    let u2 = cg.cpu_usage_ns();
    thread::sleep(Duration::from_secs(1));
    let after = (cg.cpu_usage_ns() - u2) as f64 / 1e9;
    println!("target cgroup usage in the second after revert: {after:.4} CPUs");
    assert!(after < 0.02, "usage still rising after revert: {after:.4} CPUs");
    // A second revert (e.g. after a restart) finds nothing and is not an error.
    driver.revert(&exp, &rec.0).unwrap();
}

/// The stressors of a driver whose process is SIGKILLed die within 1 s
/// (PR_SET_PDEATHSIG). The "daemon" is this test binary re-run as a helper
/// that applies a stress, prints the stressor pids and waits.
#[test]
fn stressors_die_within_a_second_of_their_daemon() {
    require_root();
    let cg = TestCgroup::new("pdeath");
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "pdeath_helper", "--nocapture", "--test-threads=1"])
        .env("CHAOSD_TEST_PDEATH_CGROUP", cg.dir("cpuacct"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let helper_pid = helper.id();
    let stdout = helper.stdout.take().unwrap();
    let guard = Proc(helper);
    let pids = read_pids_line(stdout);
    assert_eq!(pids.len(), 2, "helper printed {pids:?}");
    for p in &pids {
        assert!(alive(*p), "stressor {p} not running");
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(helper_pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let t0 = Instant::now();
    wait_until("the stressors to die with their daemon", Duration::from_secs(1), || pids.iter().all(|p| !alive(*p)));
    println!("stressors gone {:.0} ms after SIGKILL of their daemon", t0.elapsed().as_secs_f64() * 1000.0);
    drop(guard);
}

fn read_pids_line(stdout: std::process::ChildStdout) -> Vec<u32> {
    use std::io::{BufRead, BufReader};
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some((_, rest)) = line.split_once("PIDS ") {
                let _ = tx.send(rest.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>());
                break;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20)).expect("the helper printed no PIDS line within 20 s")
}

/// Not a test on its own: the "daemon" of the test above. Does nothing
/// unless started by it.
#[test]
fn pdeath_helper() {
    let Ok(cgroup) = std::env::var("CHAOSD_TEST_PDEATH_CGROUP") else { return };
    let driver = StressDriver::new(CHAOSD).unwrap();
    let exp = experiment("pdeath", Target::Cgroup(cgroup.into()), cpu(2, 5), None);
    let mut rec = VecRecorder::default();
    driver.apply(&exp, &ctx(&exp), &mut rec).unwrap();
    println!("PIDS {}", recorded_pids(&rec.0, "stressor").iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" "));
    thread::sleep(Duration::from_secs(60));
    // Only reached when the test above failed to kill us.
    driver.revert(&exp, &rec.0).unwrap();
}

/// A stressor killed from outside (not by the OOM killer) ends the
/// experiment through `tick`, with a reason that says so.
#[test]
fn a_stressor_killed_from_outside_is_reported_by_tick() {
    require_root();
    let cg = TestCgroup::new("killed");
    let driver = StressDriver::new(CHAOSD).unwrap();
    let exp = experiment("killed", Target::Cgroup(cg.dir("cpuacct")), cpu(2, 5), None);
    let mut rec = VecRecorder::default();
    driver.apply(&exp, &ctx(&exp), &mut rec).unwrap();
    let pids = recorded_pids(&rec.0, "stressor");
    assert!(driver.tick().is_empty());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0] as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut ended = Vec::new();
    wait_until("tick to report the killed stressor", Duration::from_secs(2), || {
        ended.extend(driver.tick());
        !ended.is_empty()
    });
    println!("tick: {ended:?}");
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].0, "killed");
    assert!(ended[0].1.contains(&format!("stressor pid {} was killed by signal 15", pids[0])), "{ended:?}");
    // Reported once only.
    thread::sleep(Duration::from_millis(200));
    assert!(driver.tick().is_empty());
    driver.revert(&exp, &rec.0).unwrap();
    assert!(!alive(pids[1]));
}

/// `--host`: the stressors leave chaosd's own cgroups for the root ones, so
/// they compete with everything on the host (not within a limit set on the
/// daemon's service).
#[test]
fn host_stressors_run_in_the_root_cgroups() {
    require_root();
    let driver = StressDriver::new(CHAOSD).unwrap();
    let exp = experiment("host", Target::Host, cpu(1, 2), None);
    let mut rec = VecRecorder::default();
    driver.apply(&exp, &ctx(&exp), &mut rec).unwrap_or_else(|e| panic!("apply: {e}"));
    let pid = recorded_pids(&rec.0, "stressor")[0];
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    driver.revert(&exp, &rec.0).unwrap();
    for line in cgroups.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrl, path) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
        let joined = ctrl.is_empty() || ctrl.split(',').any(|c| ["cpu", "cpuacct", "memory", "pids"].contains(&c));
        if joined {
            assert_eq!(path, "/", "stressor of a --host stress not in the root cgroup: {line}\n{cgroups}");
        }
    }
    assert!(!alive(pid));
}
