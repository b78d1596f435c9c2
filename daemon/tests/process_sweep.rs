//! Sweep after a restart: a pause guardian that no live daemon talks to
//! any more is told to resume its processes. Its own test binary: a sweep
//! acts on every guardian of this process that the sweeping driver does
//! not know.

#[path = "stress_support.rs"]
mod support;

use std::{fs, time::Duration};

use chaosd::{
    driver::Driver,
    process::{DEFAULT_GRACE, ProcessDriver},
    spec::{Fault, ProcessFault, Target},
};
use support::*;

fn state(pid: u32) -> String {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    s.rsplit_once(')').unwrap().1.split_whitespace().next().unwrap().to_string()
}

#[test]
fn sweep_makes_a_forgotten_guardian_resume_its_processes() {
    require_root();
    let target = Proc::sleeper();
    let forgetful = ProcessDriver::new(CHAOSD, DEFAULT_GRACE);
    let exp = experiment("forgotten-pause", Target::Pid(target.pid()), Fault::Process(ProcessFault::Pause), None);
    let mut rec = VecRecorder::default();
    forgetful.apply(&exp, &ctx(&exp), &mut rec).unwrap();
    let guardian = forgetful.guardian_pid(&exp.id).unwrap();
    assert_eq!(state(target.pid()), "T");
    let sweeper = ProcessDriver::new(CHAOSD, DEFAULT_GRACE);
    let removed = sweeper.sweep(&[]);
    println!("sweep: {removed:?}");
    assert_eq!(removed.len(), 1, "{removed:?}");
    wait_until("the swept guardian to resume the process", Duration::from_secs(2), || state(target.pid()) != "T");
    wait_until("the swept guardian to exit", Duration::from_secs(2), || !alive(guardian));
    forgetful.revert(&exp, &rec.0).unwrap_or_else(|e| panic!("{e:?}"));
}
