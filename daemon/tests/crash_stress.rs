//! What a crash of chaosd leaves behind for stress and process faults:
//! nothing that keeps burning, nothing that stays paused.

mod common;

use std::{
    fs,
    process::{Child, Command},
    time::Duration,
};

use common::{Daemon, require_root, wait_until};

/// A target process, killed on drop.
struct Target(Child);

impl Target {
    fn sleep() -> Self {
        Self(Command::new("sleep").arg("600").spawn().expect("spawn sleep"))
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
    fn state(&self) -> char {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("State:")).unwrap();
        line.split_whitespace().nth(1).unwrap().chars().next().unwrap()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Pids of stressors of one experiment (by their argv mark).
fn stressors(experiment: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.iter().any(|a| a == "stressor") && args.iter().any(|a| a == experiment) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn stressors_die_within_a_second_of_a_daemon_crash() {
    require_root();
    let target = Target::sleep();
    let mut d = Daemon::start();
    let pid = target.pid().to_string();
    let id =
        d.ctl_ok(&["inject", "stress", "cpu", "--pid", &pid, "--workers", "2", "--load", "30", "--duration", "5m"]);
    let id = id.trim().to_string();
    wait_until(Duration::from_secs(5), "two stressors running", || stressors(&id).len() == 2);
    d.crash();
    let t0 = std::time::Instant::now();
    wait_until(Duration::from_secs(1), "stressors gone after SIGKILL of chaosd", || stressors(&id).is_empty());
    eprintln!("stressors gone {:?} after the daemon was killed", t0.elapsed());

    // The restarted daemon closes the experiment instead of resuming a fault
    // that no longer runs.
    d.restart_after_crash(&[]);
    let exp = d.ctl_json(&["get", &id]);
    assert_ne!(exp["state"], "active", "{exp}");
    assert!(stressors(&id).is_empty());
}

#[test]
fn a_restarted_daemon_adopts_a_pause_and_resumes_the_process_at_its_deadline() {
    require_root();
    let target = Target::sleep();
    // A long grace, so that the restarted daemon (not the guardian) resumes it.
    let mut d = Daemon::start_with(&["--grace", "60s"]);
    let pid = target.pid().to_string();
    let id = d.ctl_ok(&["inject", "process", "pause", "--pid", &pid, "--duration", "4s"]).trim().to_string();
    wait_until(Duration::from_secs(2), "target stopped", || target.state() == 'T');
    d.crash();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(target.state(), 'T', "still paused while no daemon runs (grace 60s)");
    d.restart_after_crash(&["--grace", "60s"]);
    let exp = d.ctl_json(&["get", &id]);
    assert_eq!(exp["state"], "active", "the pause is still due and must be adopted: {exp}");
    assert_eq!(target.state(), 'T');
    wait_until(Duration::from_secs(6), "target resumed at the deadline", || target.state() != 'T');
    wait_until(Duration::from_secs(2), "experiment expired", || d.ctl_json(&["get", &id])["state"] == "expired");
}

#[test]
fn the_guardian_resumes_a_paused_process_when_the_daemon_stays_dead() {
    require_root();
    let target = Target::sleep();
    let mut d = Daemon::start_with(&["--grace", "1s"]);
    let pid = target.pid().to_string();
    d.ctl_ok(&["inject", "process", "pause", "--pid", &pid]);
    wait_until(Duration::from_secs(2), "target stopped", || target.state() == 'T');
    d.crash();
    wait_until(Duration::from_secs(3), "guardian resumes the target within grace + 2 s", || target.state() != 'T');
}
