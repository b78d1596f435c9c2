//! `chaosctl run` end to end, as root: a real chaosd, the local 3-node
//! cluster from scripts/cluster-up, a real MQTT workload. Needs the release
//! build of chaosd and broker next to chaosctl (`cargo build --release`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One daemon (and one cluster) at a time: their start-up sweeps and
/// address ranges would collide.
static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_chaosctl")).with_file_name(name);
    assert!(p.exists(), "{} is missing: cargo build --release -p chaosd -p broker", p.display());
    p
}

fn scripts() -> PathBuf {
    let p = match std::env::var("CHAOSCTL_SCRIPTS") {
        Ok(p) => PathBuf::from(p),
        Err(_) => Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts"),
    };
    assert!(p.join("cluster-up").exists(), "no cluster-up in {} (set CHAOSCTL_SCRIPTS)", p.display());
    p
}

struct Daemon {
    child: Child,
    socket: PathBuf,
    bpf: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Daemon {
        assert!(nix_is_root(), "this test needs root: run `sudo ./scripts/test.sh`");
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("chaosd.sock");
        let bpf = PathBuf::from(format!("/sys/fs/bpf/chaosd-run-test-{}", std::process::id()));
        let log = std::fs::File::create(dir.path().join("chaosd.log")).unwrap();
        let child = Command::new(bin("chaosd"))
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--bpf-dir")
            .arg(&bpf)
            .stderr(log)
            .spawn()
            .expect("spawn chaosd");
        let d = Daemon { child, socket, bpf, _dir: dir };
        let end = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&d.socket).is_err() {
            assert!(Instant::now() < end, "chaosd did not open its socket within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("chaosctl")).arg("--socket").arg(&self.socket).args(args).output().unwrap()
    }

    fn run(&self, plan: &Path, run_dir: &Path) -> Command {
        let mut c = Command::new(bin("chaosctl"));
        c.arg("--socket").arg(&self.socket).arg("run").arg(plan).arg("--run-dir").arg(run_dir);
        c.env("CHAOSCTL_SCRIPTS", scripts());
        c
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        unsafe_kill(self.child.id(), 15);
        let end = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.bpf);
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn unsafe_kill(pid: u32, sig: i32) {
    // SAFETY: signals one process this test started.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Removes a run's cluster even when the runner failed to.
struct RunDir(tempfile::TempDir);

impl RunDir {
    fn new() -> RunDir {
        RunDir(tempfile::Builder::new().prefix("chaosctl-run-test").tempdir().unwrap())
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.path().join("cluster").exists() {
            let _ =
                Command::new(scripts().join("cluster-down")).arg("--run-dir").arg(self.path().join("cluster")).output();
        }
    }
}

fn wait(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let end = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("chaosctl run did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn report(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("report.json")).expect("report.json written");
    serde_json::from_str(&text).expect("report.json is JSON")
}

/// Validates report.json against the shipped schema with Debian's
/// python3-jsonschema (scripts/setup.sh installs it), run by the system's
/// python so that a python on PATH without the module does not decide.
fn validate(dir: &Path) {
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(
            "import json,sys,jsonschema; jsonschema.validate(json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))); print('valid')",
        )
        .arg(dir.join("report.json"))
        .arg(dir.join("report.schema.json"))
        .output()
        .expect("/usr/bin/python3 (scripts/setup.sh installs python3-jsonschema)");
    assert!(out.status.success(), "report.json does not validate: {}", String::from_utf8_lossy(&out.stderr));
}

fn netns_of(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(String::from)
        .collect()
}

fn write_plan(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("plan.toml");
    std::fs::write(&p, text).unwrap();
    p
}

const WORKLOAD: &str = r#"
[sut]
kind = "local"
nodes = 3
restart_delay = "1s"

[workload]
publishers = [{ node = "n2", count = 2 }]
subscribers = [{ node = "n2", count = 2 }]
rate = 40
qos_mix = { qos0 = 20, qos1 = 60, qos2 = 20 }
session = "persistent"
drain = "5s"
"#;

#[test]
fn loss_passes_partition_fails_kill_recovers() {
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let d = Daemon::start();
    let rd = RunDir::new();
    let plan = write_plan(
        rd.path(),
        &format!(
            "{WORKLOAD}
[[case]]
name = \"loss\"
baseline = \"3s\"
fault_time = \"6s\"
recovery = \"4s\"
[[case.fault]]
kind = \"loss\"
target = \"n2\"
ports = [1883]
percent = 20

[[case]]
name = \"partition\"
baseline = \"3s\"
fault_time = \"2s\"
recovery = \"6s\"
[case.thresholds]
max_p99_during_ms = 1
[[case.fault]]
kind = \"partition\"
target = \"n2\"
ports = [1883]

[[case]]
name = \"kill\"
baseline = \"3s\"
fault_time = \"2s\"
recovery = \"12s\"
[case.thresholds]
max_recovery = \"30s\"
[[case.fault]]
kind = \"kill\"
target = \"n2\"
"
        ),
    );
    let out = d.run(&plan, rd.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let r = report(rd.path());
    let case = |n: &str| r["cases"].as_array().unwrap().iter().find(|c| c["name"] == n).unwrap().clone();
    let (loss, part, kill) = (case("loss"), case("partition"), case("kill"));
    assert_eq!(loss["verdict"], "pass", "loss case: {}\n{stderr}", loss["reasons"]);
    assert_eq!(loss["metrics"]["lost"][1], 0);
    assert_eq!(loss["metrics"]["lost"][2], 0);
    assert!(loss["metrics"]["sent"][1].as_u64().unwrap() > 50, "{}", loss["metrics"]);
    let dropped = loss["run"]["faults"][0]["counters"]["packets_dropped"].as_u64().unwrap();
    assert!(dropped > 0, "the loss fault dropped no packet: {}", loss["run"]["faults"][0]);
    assert_eq!(part["verdict"], "fail", "partition case: {}", part["reasons"]);
    assert!(part["reasons"][0].as_str().unwrap().contains("p99"), "{}", part["reasons"]);
    let events: Vec<String> =
        kill["run"]["events"].as_array().unwrap().iter().map(|e| e["what"].as_str().unwrap().to_string()).collect();
    assert!(events.iter().any(|e| e.contains("node n2 restarted")), "no restart event: {events:?}");
    assert!(kill["metrics"]["rto_s"].is_number(), "no RTO for the kill: {}", kill["metrics"]);
    // Exit code and report agree: a fail is 1.
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert_eq!(r["exit_code"], 1);
    assert_eq!(r["verdict"], "fail");
    assert!(stdout.contains("| loss |") && stdout.contains("report.html"), "{stdout}");
    validate(rd.path());
    let html = std::fs::read_to_string(rd.path().join("report.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 3);
    assert!(html.contains("class=\"fault-window\"") && html.contains("class=\"recovery-point\""));
    assert!(!html.contains("http://") || !html.contains("<script src"), "the report loads nothing from outside");
    // The HTML opens in headless Chromium (installed by scripts/setup.sh).
    let png = rd.path().join("report.png");
    let shot = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--window-size=1000,1600"])
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", rd.path().join("report.html").display()))
        .output()
        .expect("chromium (scripts/setup.sh installs it)");
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(size > 20_000, "no screenshot of report.html ({size} bytes): {}", String::from_utf8_lossy(&shot.stderr));
    // Every second of the loss case has a point per QoS.
    let secs = loss["windows"].as_array().unwrap().len();
    assert!(secs >= 12, "{secs} seconds recorded");
    let listed = d.ctl(&["list"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("no active experiments"));
}

#[test]
fn a_workload_that_cannot_connect_is_unknown() {
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let d = Daemon::start();
    let rd = RunDir::new();
    // Nothing listens on port 1 of loopback.
    let plan = write_plan(
        rd.path(),
        r#"
[sut]
kind = "attach"
[[sut.node]]
name = "n1"
mqtt = "127.0.0.1:1"
[workload]
publishers = [{ node = "n1", count = 1 }]
subscribers = [{ node = "n1", count = 1 }]
rate = 10
steady_state = "3s"
drain = "1s"
[[case]]
name = "loss"
baseline = "2s"
fault_time = "2s"
recovery = "2s"
[[case.fault]]
kind = "pause"
target = "n1"
"#,
    );
    let out = d.run(&plan, rd.path()).output().unwrap();
    let r = report(rd.path());
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(r["cases"][0]["verdict"], "unknown");
    let why = r["cases"][0]["reasons"][0].as_str().unwrap();
    assert!(why.contains("steady state") && why.contains("0 of 1 subscriber"), "{why}");
    assert_eq!(r["steady_state"]["reached"], false);
    // Nothing was injected.
    assert!(r["cases"][0]["run"]["faults"].as_array().unwrap().is_empty());
    assert!(String::from_utf8_lossy(&d.ctl(&["list", "--all"]).stdout).contains("no experiments"));
    validate(rd.path());
}

#[test]
fn sigint_mid_case_recovers_and_removes_everything() {
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let d = Daemon::start();
    let rd = RunDir::new();
    let before = netns_of("cr");
    let plan = write_plan(
        rd.path(),
        &format!(
            "{WORKLOAD}
[[case]]
name = \"long-partition\"
baseline = \"2s\"
fault_time = \"60s\"
recovery = \"5s\"
[[case.fault]]
kind = \"partition\"
target = \"n3\"
ports = [7000]
"
        ),
    );
    let log = std::fs::File::create(rd.path().join("stderr.log")).unwrap();
    let mut child = d.run(&plan, rd.path()).stdout(Stdio::null()).stderr(log).spawn().unwrap();
    // Wait for the fault to be active.
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let l = d.ctl(&["list"]);
        if String::from_utf8_lossy(&l.stdout).contains("partition") {
            break;
        }
        assert!(
            Instant::now() < end,
            "the fault never became active: {}",
            std::fs::read_to_string(rd.path().join("stderr.log")).unwrap()
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended early: {}",
            std::fs::read_to_string(rd.path().join("stderr.log")).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let topo: Value =
        serde_json::from_str(&std::fs::read_to_string(rd.path().join("cluster/topology.json")).unwrap()).unwrap();
    let name = topo["name"].as_str().unwrap().to_string();
    unsafe_kill(child.id(), 2);
    let status = wait(&mut child, Duration::from_secs(60));
    assert_eq!(status.code(), Some(2), "an interrupted run is not a pass");
    let l = d.ctl(&["list"]);
    assert!(
        String::from_utf8_lossy(&l.stdout).contains("no active experiments"),
        "{}",
        String::from_utf8_lossy(&l.stdout)
    );
    assert!(netns_of(&name).is_empty(), "namespaces left: {:?}", netns_of(&name));
    assert_eq!(netns_of("cr"), before);
    let ps = Command::new("pgrep").arg("-f").arg(rd.path().join("cluster")).output().unwrap();
    assert!(ps.stdout.is_empty(), "processes of the run remain: {}", String::from_utf8_lossy(&ps.stdout));
    let r = report(rd.path());
    assert_eq!(r["cases"][0]["verdict"], "unknown");
    assert!(r["cases"][0]["reasons"][0].as_str().unwrap().contains("interrupted"), "{}", r["cases"][0]["reasons"]);
}
