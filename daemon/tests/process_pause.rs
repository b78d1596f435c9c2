//! Pause and kill on real processes (root).

#[path = "stress_support.rs"]
mod support;

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use chaosd::{
    driver::Driver,
    process::{DEFAULT_GRACE, ProcessDriver},
    spec::{Fault, ProcessFault, Target},
};
use support::*;

const PAUSE: Fault = Fault::Process(ProcessFault::Pause);

/// A process printing a counter every 100 ms; remembers when each line came.
struct Counter {
    proc: Proc,
    lines: Arc<Mutex<Vec<Instant>>>,
}

impl Counter {
    fn start() -> Self {
        let mut child: Child = Command::new("python3")
            .args([
                "-u",
                "-c",
                "import itertools, time\nfor i in itertools.count():\n    print(i, flush=True)\n    time.sleep(0.1)\n",
            ])
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("this test needs python3 for its counter process: {e}"));
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                if line.is_err() {
                    break;
                }
                l.lock().unwrap().push(Instant::now());
            }
        });
        let c = Self { proc: Proc(child), lines };
        wait_until("the counter to print", Duration::from_secs(5), || c.count() >= 2);
        c
    }
    fn pid(&self) -> u32 {
        self.proc.pid()
    }
    fn count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }
    fn between(&self, a: Instant, b: Instant) -> usize {
        self.lines.lock().unwrap().iter().filter(|t| **t > a && **t < b).count()
    }
}

fn state(pid: u32) -> char {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    s.rsplit_once(')').unwrap().1.split_whitespace().next().unwrap().chars().next().unwrap()
}

#[test]
fn a_paused_counter_prints_nothing_and_resumes_after() {
    require_root();
    let counter = Counter::start();
    let driver = ProcessDriver::new(CHAOSD, DEFAULT_GRACE);
    let exp = experiment("pause-1", Target::Pid(counter.pid()), PAUSE, Some(Duration::from_secs(30)));
    let mut rec = VecRecorder::default();
    let t0 = Instant::now();
    driver.apply(&exp, &ctx(&exp), &mut rec).unwrap_or_else(|e| panic!("apply: {e}"));
    let kinds: Vec<&str> = rec.0.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["pause-guardian-intent", "pause-guardian", "paused"], "{:?}", rec.0);
    assert_eq!(state(counter.pid()), 'T');
    thread::sleep(Duration::from_millis(1500));
    let t1 = Instant::now();
    assert_eq!(driver.counters(&exp, &rec.0).processes_signalled, 1);
    assert!(driver.tick().is_empty());
    let guardian = driver.guardian_pid(&exp.id).unwrap();
    // The guardian keeps CAP_KILL (bit 5) and nothing else.
    wait_until("the guardian to narrow its capabilities", Duration::from_secs(2), || {
        let status = fs::read_to_string(format!("/proc/{guardian}/status")).unwrap();
        status.lines().any(|l| l == "CapPrm:\t0000000000000020")
    });
    driver.revert(&exp, &rec.0).unwrap_or_else(|e| panic!("revert: {e:?}"));
    let during = counter.between(t0 + Duration::from_millis(150), t1);
    println!("lines printed during the 1.5 s pause: {during}");
    assert_eq!(during, 0, "the paused counter printed");
    let n = counter.count();
    wait_until("the counter to print again", Duration::from_secs(1), || counter.count() >= n + 3);
    assert!(!alive(guardian), "the guardian should exit at revert");
}

#[test]
fn a_guardian_resumes_the_processes_after_the_daemon_dies() {
    require_root();
    let counter = Counter::start();
    // The "daemon": this test binary re-run as a helper, with a 1 s grace.
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "guardian_helper", "--nocapture", "--test-threads=1"])
        .env("CHAOSD_TEST_PAUSE_PID", counter.pid().to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = helper.stdout.take().unwrap();
    let helper_pid = helper.id();
    let _helper = Proc(helper);
    let mut guardian = 0;
    for line in BufReader::new(out).lines() {
        let line = line.unwrap();
        if let Some((_, g)) = line.split_once("GUARDIAN ") {
            guardian = g.trim().parse().unwrap();
            break;
        }
    }
    assert!(guardian > 0 && alive(guardian));
    assert_eq!(state(counter.pid()), 'T');
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(helper_pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    thread::sleep(Duration::from_millis(500));
    // On a loaded machine the sleep can outlast the grace period itself:
    // what must hold is that the process is still stopped while less than
    // the grace period has passed.
    let (seen, at) = (state(counter.pid()), killed.elapsed());
    assert!(seen == 'T' || at >= Duration::from_secs(1), "resumed {at:?} after the daemon died, before the 1 s grace");
    let n = counter.count();
    wait_until("the guardian to resume the counter", Duration::from_secs(3), || counter.count() > n);
    println!("counter resumed {:.2} s after its daemon was killed (grace 1 s)", killed.elapsed().as_secs_f64());
    wait_until("the guardian to exit", Duration::from_secs(2), || !alive(guardian));
}

#[test]
fn guardian_helper() {
    let Ok(pid) = std::env::var("CHAOSD_TEST_PAUSE_PID") else { return };
    let driver = ProcessDriver::new(CHAOSD, Duration::from_secs(1));
    let exp = experiment("pause-helper", Target::Pid(pid.parse().unwrap()), PAUSE, Some(Duration::from_secs(60)));
    let mut rec = VecRecorder::default();
    driver.apply(&exp, &ctx(&exp), &mut rec).unwrap();
    println!("GUARDIAN {}", driver.guardian_pid(&exp.id).unwrap());
    thread::sleep(Duration::from_secs(30));
    driver.revert(&exp, &rec.0).unwrap();
}

#[test]
fn the_guardian_resumes_at_the_deadline_when_nobody_else_does() {
    require_root();
    let target = Proc::sleeper();
    let driver = ProcessDriver::new(CHAOSD, DEFAULT_GRACE);
    let exp = experiment("deadline", Target::Pid(target.pid()), PAUSE, Some(Duration::from_millis(500)));
    let mut rec = VecRecorder::default();
    driver.apply(&exp, &ctx(&exp), &mut rec).unwrap();
    assert_eq!(state(target.pid()), 'T');
    let t0 = Instant::now();
    // The engine would end it at 0.5 s; here nobody does, so the guardian
    // resumes it one second later.
    wait_until("the guardian to resume at its deadline", Duration::from_secs(4), || state(target.pid()) != 'T');
    println!("resumed by the guardian {:.2} s after apply (deadline 0.5 s + 1 s slack)", t0.elapsed().as_secs_f64());
    wait_until("the driver to notice the guardian exit", Duration::from_secs(2), || !driver.tick().is_empty());
    driver.revert(&exp, &rec.0).unwrap();
}

#[test]
fn pause_by_name_and_by_cgroup_stops_every_process() {
    require_root();
    // Two processes whose comm is a unique name (comm comes from the name
    // the binary was executed by, here a symlink).
    let dir = tempfile::tempdir().unwrap();
    let name = format!("pz{}", std::process::id() % 100000);
    let link = dir.path().join(&name);
    std::os::unix::fs::symlink(fs::canonicalize("/bin/sleep").unwrap(), &link).unwrap();
    let a = Proc(Command::new(&link).arg("100").spawn().unwrap());
    let b = Proc(Command::new(&link).arg("100").spawn().unwrap());
    let driver = ProcessDriver::new(CHAOSD, DEFAULT_GRACE);
    let exp = experiment("byname", Target::ProcessName(name.clone()), PAUSE, None);
    let mut rec = VecRecorder::default();
    wait_until("comm to be set", Duration::from_secs(2), || {
        fs::read_to_string(format!("/proc/{}/comm", b.pid())).unwrap().trim() == name
    });
    driver.apply(&exp, &ctx(&exp), &mut rec).unwrap_or_else(|e| panic!("apply: {e}"));
    assert_eq!((state(a.pid()), state(b.pid())), ('T', 'T'));
    assert_eq!(driver.counters(&exp, &rec.0).processes_signalled, 2);
    driver.revert(&exp, &rec.0).unwrap();
    assert_eq!((state(a.pid()), state(b.pid())), ('S', 'S'));

    let cg = TestCgroup::new("pausecg");
    cg.add(a.pid());
    cg.add(b.pid());
    let exp = experiment("bycg", Target::Cgroup(cg.dir("memory")), PAUSE, None);
    let mut rec = VecRecorder::default();
    driver.apply(&exp, &ctx(&exp), &mut rec).unwrap_or_else(|e| panic!("apply: {e}"));
    assert_eq!((state(a.pid()), state(b.pid())), ('T', 'T'));
    // A second pause of the same process is refused.
    let again = experiment("again", Target::Pid(a.pid()), PAUSE, None);
    let e = driver.apply(&again, &ctx(&again), &mut VecRecorder::default()).unwrap_err();
    assert!(e.to_string().contains("already paused"), "{e}");
    driver.revert(&exp, &rec.0).unwrap();
    assert_eq!((state(a.pid()), state(b.pid())), ('S', 'S'));
}

/// What the engine does at restart for a pause still due: the new driver
/// adopts it from the journal (new guardian, the old one stands down
/// without resuming), and its revert resumes the process.
#[test]
fn after_a_restart_a_new_driver_adopts_the_pause_and_reverts_it() {
    require_root();
    let target = Proc::sleeper();
    let old = ProcessDriver::new(CHAOSD, DEFAULT_GRACE);
    let exp = experiment("adopt", Target::Pid(target.pid()), PAUSE, Some(Duration::from_secs(60)));
    let mut rec = VecRecorder::default();
    old.apply(&exp, &ctx(&exp), &mut rec).unwrap();
    let old_guardian = old.guardian_pid(&exp.id).unwrap();
    // The restarted daemon knows only the journal.
    let new = ProcessDriver::new(CHAOSD, DEFAULT_GRACE);
    new.adopt(&exp, &rec.0).unwrap_or_else(|e| panic!("adopt: {e}"));
    let new_guardian = new.guardian_pid(&exp.id).unwrap();
    assert_ne!(new_guardian, old_guardian);
    wait_until("the old guardian to stand down", Duration::from_secs(2), || !alive(old_guardian));
    assert_eq!(state(target.pid()), 'T', "standing down must not resume");
    new.revert(&exp, &rec.0).unwrap();
    // Resumed: running for a moment ('R'), then back to its sleep ('S').
    wait_until("the target to resume", Duration::from_secs(2), || state(target.pid()) == 'S');
    assert!(!alive(new_guardian));
    // Nothing stopped any more: adopting again fails so the engine reverts.
    assert!(new.adopt(&exp, &rec.0).is_err());
    drop(old);
}

/// A fresh driver (no memory of the pause) resumes from the journal alone.
#[test]
fn revert_from_the_journal_alone_resumes_and_dismisses_the_guardian() {
    require_root();
    let target = Proc::sleeper();
    let old = ProcessDriver::new(CHAOSD, DEFAULT_GRACE);
    let exp = experiment("journal-only", Target::Pid(target.pid()), PAUSE, Some(Duration::from_secs(60)));
    let mut rec = VecRecorder::default();
    old.apply(&exp, &ctx(&exp), &mut rec).unwrap();
    let old_guardian = old.guardian_pid(&exp.id).unwrap();
    let new = ProcessDriver::new(CHAOSD, DEFAULT_GRACE);
    new.revert(&exp, &rec.0).unwrap_or_else(|e| panic!("revert: {e:?}"));
    // Resumed: running for a moment ('R'), then back to its sleep ('S').
    wait_until("the target to resume", Duration::from_secs(2), || state(target.pid()) == 'S');
    wait_until("the old guardian to be dismissed", Duration::from_secs(2), || !alive(old_guardian));
    drop(old);
}

#[test]
fn kill_sends_the_signal_once() {
    require_root();
    let mut target = Proc::sleeper();
    let driver = ProcessDriver::new(CHAOSD, DEFAULT_GRACE);
    let exp = experiment("kill", Target::Pid(target.pid()), Fault::Process(ProcessFault::Kill { signal: 15 }), None);
    let mut rec = VecRecorder::default();
    driver.apply(&exp, &ctx(&exp), &mut rec).unwrap();
    let status = target.0.wait().unwrap();
    assert_eq!(status.signal(), Some(15));
    assert_eq!(driver.counters(&exp, &rec.0).processes_signalled, 1);
    driver.revert(&exp, &rec.0).unwrap();
}
