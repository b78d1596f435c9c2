//! Shared by the stress_* and process_* privileged tests (included with
//! `#[path]`): a test-made cgroup removed by Drop, child processes killed by
//! Drop, a recorder that keeps what the driver journals, and experiments.
//! Compiled on its own too, as a test crate without tests.
#![allow(dead_code, reason = "each test crate uses a different part of the support code")]

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime},
};

use chaosd::{
    driver::{ApplyContext, Recorder},
    error::ApiError,
    experiment::Experiment,
    spec::{Fault, Target},
    stress::cgroup::{Layout, Roots},
};
use serde_json::Value;

pub const CHAOSD: &str = env!("CARGO_BIN_EXE_chaosd");

/// These tests move processes between cgroups and signal other processes.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (it creates cgroups and signals processes): run `sudo cargo test`");
    }
}

pub fn unique(tag: &str) -> String {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("chaosd-test-{tag}-{}-{nanos:x}", std::process::id())
}

/// A cgroup made for one test: `chaosd-test-<unique>` in every v1
/// hierarchy chaosd joins (or once in v2). Drop kills whatever is still in
/// it and removes it, also when the test panicked.
pub struct TestCgroup {
    pub name: String,
    pub v2: bool,
    /// (controllers, directory)
    pub dirs: Vec<(Vec<String>, PathBuf)>,
}

impl TestCgroup {
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        let layout = Layout::detect(&Roots::host()).unwrap_or_else(|e| panic!("no usable cgroup hierarchy: {e}"));
        let (v2, dirs) = match layout {
            Layout::V2 { mount } => (true, vec![(vec!["cpu".into(), "memory".into()], mount.join(&name))]),
            Layout::V1 { hierarchies } => {
                (false, hierarchies.into_iter().map(|h| (h.controllers.clone(), h.mount.join(&name))).collect())
            }
        };
        let cg = Self { name, v2, dirs };
        for (_, d) in &cg.dirs {
            fs::create_dir(d).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", d.display()));
        }
        cg
    }

    /// The directory holding `controller`.
    pub fn dir(&self, controller: &str) -> PathBuf {
        self.dirs
            .iter()
            .find(|(c, _)| c.iter().any(|x| x == controller))
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| panic!("no {controller} hierarchy holds the test cgroup"))
    }

    pub fn add(&self, pid: u32) {
        for (_, d) in &self.dirs {
            fs::write(d.join("cgroup.procs"), pid.to_string())
                .unwrap_or_else(|e| panic!("adding {pid} to {}: {e}", d.display()));
        }
    }

    pub fn write(&self, controller: &str, file: &str, value: &str) {
        let p = self.dir(controller).join(file);
        fs::write(&p, value).unwrap_or_else(|e| panic!("writing {value} to {}: {e}", p.display()));
    }

    pub fn read(&self, controller: &str, file: &str) -> String {
        let p = self.dir(controller).join(file);
        fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
    }

    /// CPU time charged to the cgroup, ns.
    pub fn cpu_usage_ns(&self) -> u64 {
        if self.v2 {
            let stat = self.read("cpu", "cpu.stat");
            let us: u64 =
                stat.lines().find_map(|l| l.strip_prefix("usage_usec ")).expect("usage_usec").trim().parse().unwrap();
            us * 1000
        } else {
            self.read("cpuacct", "cpuacct.usage").trim().parse().unwrap()
        }
    }

    pub fn procs(&self) -> Vec<u32> {
        let mut all: Vec<u32> = self
            .dirs
            .iter()
            .flat_map(|(_, d)| {
                fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Gives it a large CPU weight, so that other work on a shared build
    /// machine does not starve it: the CPU tests measure the stressors'
    /// duty cycle, not how busy the machine is.
    pub fn favour_cpu(&self) {
        if self.v2 {
            self.write("cpu", "cpu.weight", "10000");
        } else {
            self.write("cpu", "cpu.shares", "262144");
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let procs = self.procs();
            if procs.is_empty() {
                break;
            }
            for p in procs {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), nix::sys::signal::Signal::SIGKILL);
            }
            if Instant::now() > deadline {
                eprintln!("TestCgroup: processes still in {} after 5 s", self.name);
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        for (_, d) in &self.dirs {
            // rmdir can fail with EBUSY while the last process is being reaped.
            for _ in 0..100 {
                if fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            if d.exists() {
                eprintln!("TestCgroup: could not remove {}", d.display());
            }
        }
    }
}

/// A child process killed and reaped on Drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn sleeper() -> Self {
        Self(Command::new("sleep").arg("1000").stdin(Stdio::null()).spawn().expect("spawning sleep"))
    }
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Default)]
pub struct VecRecorder(pub Vec<Value>);

impl Recorder for VecRecorder {
    fn record(&mut self, object: Value) -> Result<(), ApiError> {
        self.0.push(object);
        Ok(())
    }
}

pub fn experiment(id: &str, target: Target, fault: Fault, duration: Option<Duration>) -> Experiment {
    Experiment::new(id.into(), target, fault, duration, false, SystemTime::now())
}

pub fn ctx(exp: &Experiment) -> ApplyContext<'_> {
    ApplyContext { active: &[], duration: exp.duration }
}

/// Whether a process exists and has not exited (zombies count as gone).
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()).unwrap_or("X");
            !matches!(state, "Z" | "X")
        }
        Err(_) => false,
    }
}

/// The pids that a driver recorded in objects with `"kind": kind`.
pub fn recorded_pids(objects: &[Value], kind: &str) -> Vec<u32> {
    objects.iter().filter(|o| o["kind"] == kind).filter_map(|o| o["pid"].as_u64()).map(|p| p as u32).collect()
}

/// Processes whose /proc/PID/cgroup names `name`.
pub fn in_cgroup(pid: u32, name: &str) -> bool {
    fs::read_to_string(format!("/proc/{pid}/cgroup")).map(|s| s.contains(name)).unwrap_or(false)
}

pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

pub fn path_of(p: &Path) -> Target {
    Target::Cgroup(p.to_path_buf())
}
