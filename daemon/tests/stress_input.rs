//! Bad stress requests that only the live system can judge: each is refused
//! with the right code and a message that says what to do, and nothing is
//! started (nothing was even journalled).

#[path = "stress_support.rs"]
mod support;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use chaosd::{
    driver::Driver,
    error::ApiError,
    experiment::Experiment,
    spec::{Fault, MemorySize, StressFault, Target},
    stress::StressDriver,
};
use support::*;

fn cpus() -> u32 {
    std::thread::available_parallelism().unwrap().get() as u32
}

fn cpu(workers: u32) -> Fault {
    Fault::Stress(StressFault::Cpu { workers, load_percent: 1 })
}

/// Applies and expects a refusal; returns its message.
fn refused(driver: &StressDriver, exp: &Experiment) -> ApiError {
    let mut rec = VecRecorder::default();
    match driver.apply(exp, &ctx(exp), &mut rec) {
        Ok(_) => {
            let _ = driver.revert(exp, &rec.0);
            panic!("{:?} on {} was accepted", exp.fault, exp.target);
        }
        Err(e) => {
            assert!(rec.0.is_empty(), "refused, but journalled {:?}", rec.0);
            println!("{}: {e}", exp.id);
            e
        }
    }
}

#[test]
fn too_many_workers_needs_force() {
    require_root();
    let driver = StressDriver::new(CHAOSD).unwrap();
    let n = 4 * cpus() + 1;
    let mut exp = experiment("workers", Target::Host, cpu(n), None);
    let e = refused(&driver, &exp);
    assert!(matches!(e, ApiError::InvalidArgument(_)), "{e:?}");
    assert!(e.to_string().contains("--force"), "{e}");
    // With --force it runs (at 1% load each, briefly).
    let cg = TestCgroup::new("force");
    exp.target = path_of(&cg.dir("cpuacct"));
    exp.forced = true;
    let mut rec = VecRecorder::default();
    driver.apply(&exp, &ctx(&exp), &mut rec).unwrap_or_else(|e| panic!("forced apply: {e}"));
    assert_eq!(recorded_pids(&rec.0, "stressor").len(), n as usize);
    driver.revert(&exp, &rec.0).unwrap();
}

#[test]
fn more_memory_than_the_host_has_needs_force() {
    require_root();
    let driver = StressDriver::new(CHAOSD).unwrap();
    let host = chaosd::process::procfs::mem_total_bytes().unwrap();
    let exp = experiment(
        "size",
        Target::Host,
        Fault::Stress(StressFault::Memory { size: MemorySize::Bytes(host + (1 << 30)), workers: 1, oom_target: false }),
        None,
    );
    let e = refused(&driver, &exp);
    assert!(matches!(e, ApiError::InvalidArgument(_)), "{e:?}");
    assert!(e.to_string().contains("--force") && e.to_string().contains("memory"), "{e}");
}

#[test]
fn cgroups_that_do_not_exist_or_lie_outside_sys_fs_cgroup() {
    require_root();
    let driver = StressDriver::new(CHAOSD).unwrap();
    let missing = experiment("missing", Target::Cgroup("/sys/fs/cgroup/memory/chaosd-test-nope".into()), cpu(1), None);
    let e = refused(&driver, &missing);
    assert!(matches!(e, ApiError::NotFound(_)), "{e:?}");
    assert!(e.to_string().contains("chaosd-test-nope"), "{e}");
    for path in ["/tmp", "/sys/fs/cgroup/../../etc", "/sys/fs/cgroupx"] {
        let e = refused(&driver, &experiment("outside", Target::Cgroup(path.into()), cpu(1), None));
        assert!(matches!(e, ApiError::InvalidArgument(_) | ApiError::NotFound(_)), "{path}: {e:?}");
        if path != "/sys/fs/cgroupx" {
            assert!(matches!(e, ApiError::InvalidArgument(_)), "{path}: {e:?}");
            assert!(e.to_string().contains("outside /sys/fs/cgroup"), "{e}");
        }
    }
}

#[test]
fn pids_that_do_not_exist_have_exited_or_are_init_or_chaosd() {
    require_root();
    let driver = StressDriver::new(CHAOSD).unwrap();
    // A pid that was just freed.
    let mut gone = Command::new("true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let e = refused(&driver, &experiment("nopid", Target::Pid(gone_pid), cpu(1), None));
    assert!(matches!(e, ApiError::NotFound(_)) && e.to_string().contains("does not exist"), "{e:?}");
    // A pid that exited and was not reaped yet (a zombie).
    let zombie = Command::new("true").stdin(Stdio::null()).spawn().unwrap();
    let zpid = zombie.id();
    let _zombie = Proc(zombie);
    wait_until("the child to exit", Duration::from_secs(5), || !alive(zpid));
    let e = refused(&driver, &experiment("zombie", Target::Pid(zpid), cpu(1), None));
    assert!(matches!(e, ApiError::NotFound(_)) && e.to_string().contains("exited"), "{e:?}");
    let e = refused(&driver, &experiment("init", Target::Pid(1), cpu(1), None));
    assert!(matches!(e, ApiError::InvalidArgument(_)) && e.to_string().contains("--host"), "{e:?}");
    let e = refused(&driver, &experiment("self", Target::Pid(std::process::id()), cpu(1), None));
    assert!(matches!(e, ApiError::InvalidArgument(_)) && e.to_string().contains("chaosd itself"), "{e:?}");
}
