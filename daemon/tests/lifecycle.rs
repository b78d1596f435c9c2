//! An experiment's life as a user sees it: inject, list with remaining time,
//! watch the state changes stream, expiry ends it on time, and the journal
//! keeps it for `list --all`.

mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{Daemon, chaosctl, require_root, wait_until};

/// Seconds within the day of an RFC 3339 UTC timestamp "....THH:MM:SS.mmmZ".
fn seconds_of(v: &serde_json::Value) -> f64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}"));
    let time = s.split('T').nth(1).unwrap().trim_end_matches('Z');
    let mut parts = time.split(':').map(|p| p.parse::<f64>().unwrap());
    let (h, m, sec) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
    h * 3600.0 + m * 60.0 + sec
}

fn proc_state(pid: u32) -> char {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find(|l| l.starts_with("State:")).unwrap().split_whitespace().nth(1).unwrap().chars().next().unwrap()
}

#[test]
fn watch_streams_every_state_change_and_expiry_ends_on_time() {
    require_root();
    let mut target = Command::new("sleep").arg("600").spawn().unwrap();
    let pid = target.id();
    let d = Daemon::start();

    // A watcher, as `chaosctl watch -o json` prints one JSON object per line.
    let mut watcher = Command::new(chaosctl())
        .arg("--socket")
        .arg(&d.socket)
        .args(["watch", "--output", "json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<serde_json::Value>();
    let out = watcher.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(serde_json::from_str(&line).expect("watch prints JSON lines")).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));

    let t0 = Instant::now();
    let exp = d.ctl_json(&["inject", "process", "pause", "--pid", &pid.to_string(), "--duration", "2s"]);
    let inject_took = t0.elapsed().as_secs_f64();
    let id = exp["id"].as_str().unwrap().to_string();
    assert_eq!(exp["state"], "active");
    assert_eq!(proc_state(pid), 'T');

    let listed = d.ctl_ok(&["list"]);
    assert!(listed.contains(&id) && listed.contains("active") && listed.contains("pause"), "{listed}");

    wait_until(Duration::from_secs(10), "the pause to expire", || proc_state(pid) != 'T');
    eprintln!("pause observed over after {:?} (client side, includes RPCs)", t0.elapsed());
    wait_until(Duration::from_secs(2), "state expired", || d.ctl_json(&["get", &id])["state"] == "expired");
    let ended = d.ctl_json(&["get", &id]);
    assert_eq!(ended["reason"], "duration elapsed", "{ended}");
    assert!(ended["remaining"].is_null());
    // The daemon's own record: the deadline is the duration after the fault
    // took effect (after creation, within the inject call), and the fault
    // ended within a few ticker periods of it.
    let (created, ends, ended_at) =
        (seconds_of(&ended["created_at"]), seconds_of(&ended["ends_at"]), seconds_of(&ended["ended_at"]));
    let applying = ends - created - 2.0;
    assert!(
        (0.0..=inject_took).contains(&applying),
        "deadline {ends} is not 2 s after the pause took effect (created {created}, inject call took {inject_took:.3} s)"
    );
    let late = ended_at - ends;
    assert!((0.0..0.5).contains(&late), "ended {late:.3} s after its deadline");

    // The stream carried the whole life, in order, from the moment the
    // request became an experiment (active): the intent journaled before
    // the kernel is touched is not announced, since a refused request is
    // forgotten rather than ended.
    let mut states = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && states.last().map(String::as_str) != Some("expired") {
        if let Ok(ev) = rx.recv_timeout(Duration::from_millis(200))
            && ev["id"] == id.as_str()
            && ev["event"] == "state"
        {
            states.push(ev["state"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(states, ["active", "recovering", "expired"], "watched states");

    assert!(d.ctl_json(&["list"]).as_array().unwrap().is_empty(), "no active experiment left");
    let all = d.ctl_json(&["list", "--all"]);
    assert!(all.as_array().unwrap().iter().any(|e| e["id"] == id.as_str() && e["state"] == "expired"), "{all}");

    let _ = watcher.kill();
    let _ = watcher.wait();
    let _ = target.kill();
    let _ = target.wait();
}

#[test]
fn a_clean_stop_recovers_active_experiments() {
    require_root();
    let mut target = Command::new("sleep").arg("600").spawn().unwrap();
    let pid = target.id();
    let mut d = Daemon::start();
    d.ctl_ok(&["inject", "process", "pause", "--pid", &pid.to_string()]);
    assert_eq!(proc_state(pid), 'T');
    let (status, stderr) = d.stop();
    assert!(status.success(), "{stderr}");
    assert_ne!(proc_state(pid), 'T', "a clean stop must resume what it paused");
    let _ = target.kill();
    let _ = target.wait();
}
