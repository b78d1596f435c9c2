//! Bad process-fault requests that need the live system: refused with the
//! right code and a message that says what to do, nothing signalled.

#[path = "stress_support.rs"]
mod support;

use std::{fs, process::Command, time::Duration};

use chaosd::{
    driver::Driver,
    error::ApiError,
    process::{DEFAULT_GRACE, ProcessDriver},
    spec::{Fault, ProcessFault, Target},
};
use support::*;

fn refused(driver: &ProcessDriver, target: Target, fault: Fault) -> ApiError {
    let exp = experiment("bad", target, fault, Some(Duration::from_secs(10)));
    let mut rec = VecRecorder::default();
    match driver.apply(&exp, &ctx(&exp), &mut rec) {
        Ok(_) => {
            let _ = driver.revert(&exp, &rec.0);
            panic!("{:?} on {} was accepted", exp.fault, exp.target);
        }
        Err(e) => {
            assert!(rec.0.is_empty(), "refused, but journalled {:?}", rec.0);
            println!("{}: {e}", exp.target);
            e
        }
    }
}

const PAUSE: Fault = Fault::Process(ProcessFault::Pause);
const KILL: Fault = Fault::Process(ProcessFault::Kill { signal: 9 });

#[test]
fn names_that_match_nothing() {
    require_root();
    let d = ProcessDriver::new(CHAOSD, DEFAULT_GRACE);
    for f in [PAUSE, KILL] {
        let e = refused(&d, Target::ProcessName("no-such-proc-x".into()), f);
        assert!(matches!(e, ApiError::NotFound(_)) && e.to_string().contains("no process is named"), "{e:?}");
    }
    // Longer than the kernel keeps: the message says what comm would be.
    let e = refused(&d, Target::ProcessName("a-very-long-process-name".into()), PAUSE);
    assert!(e.to_string().contains("'a-very-long-pro'"), "{e}");
}

#[test]
fn init_and_chaosd_itself_are_refused() {
    require_root();
    let d = ProcessDriver::new(CHAOSD, DEFAULT_GRACE);
    for f in [PAUSE, KILL] {
        let e = refused(&d, Target::Pid(1), f.clone());
        assert!(matches!(e, ApiError::InvalidArgument(_)) && e.to_string().contains("PID 1"), "{e:?}");
        let e = refused(&d, Target::Pid(std::process::id()), f.clone());
        assert!(matches!(e, ApiError::InvalidArgument(_)) && e.to_string().contains("chaosd itself"), "{e:?}");
        // By name: this test binary's own comm.
        let comm = fs::read_to_string("/proc/self/comm").unwrap().trim().to_string();
        let e = refused(&d, Target::ProcessName(comm), f.clone());
        assert!(matches!(e, ApiError::InvalidArgument(_)) && e.to_string().contains("chaosd itself"), "{e:?}");
        // PID 1 by name.
        let init = fs::read_to_string("/proc/1/comm").unwrap().trim().to_string();
        let e = refused(&d, Target::ProcessName(init), f);
        assert!(matches!(e, ApiError::InvalidArgument(_)) && e.to_string().contains("PID 1"), "{e:?}");
    }
}

#[test]
fn pids_that_do_not_exist_or_exited_and_other_targets() {
    require_root();
    let d = ProcessDriver::new(CHAOSD, DEFAULT_GRACE);
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let e = refused(&d, Target::Pid(pid), PAUSE);
    assert!(matches!(e, ApiError::NotFound(_)) && e.to_string().contains("does not exist"), "{e:?}");
    let zombie = Proc(Command::new("true").spawn().unwrap());
    wait_until("the child to exit", Duration::from_secs(5), || !alive(zombie.pid()));
    let e = refused(&d, Target::Pid(zombie.pid()), KILL);
    assert!(matches!(e, ApiError::NotFound(_)) && e.to_string().contains("exited"), "{e:?}");
    let e = refused(&d, Target::Host, PAUSE);
    assert!(matches!(e, ApiError::InvalidArgument(_)), "{e:?}");
    let e = refused(&d, Target::Cgroup("/sys/fs/cgroup/memory/chaosd-test-nope".into()), PAUSE);
    assert!(matches!(e, ApiError::NotFound(_)), "{e:?}");
    let e = refused(&d, Target::Cgroup("/etc".into()), PAUSE);
    assert!(matches!(e, ApiError::InvalidArgument(_)), "{e:?}");
    // An empty cgroup has nothing to pause.
    let cg = TestCgroup::new("empty");
    let e = refused(&d, Target::Cgroup(cg.dir("memory")), PAUSE);
    assert!(matches!(e, ApiError::NotFound(_)) && e.to_string().contains("holds no process"), "{e:?}");
}
