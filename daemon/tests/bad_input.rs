//! Bad requests as a user types them: each gets one readable line from
//! chaosctl, a non-zero exit, and changes nothing (no experiment appears).

mod common;

use common::{Daemon, require_root, text};

/// Runs chaosctl with `args`, expects exit 1 and one line containing `expect`.
fn refused(d: &Daemon, args: &[&str], expect: &str) {
    let out = d.ctl(args);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "chaosctl {args:?} should be refused; stderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line for {args:?}: {err}");
    assert!(err.contains(expect), "chaosctl {args:?}: expected '{expect}' in: {err}");
}

#[test]
fn malformed_requests_are_refused_with_what_was_wrong() {
    require_root();
    let d = Daemon::start();
    let loss = ["inject", "network", "loss", "--netns", "n1"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v: Vec<&'static str> = loss.to_vec();
        v.extend_from_slice(extra);
        v
    };
    refused(&d, &with(&["--percent", "10", "--port", "0"]), "port 0 is not a port");
    refused(&d, &with(&["--percent", "10", "--port", "65536"]), "65536 is not a port");
    refused(&d, &with(&["--percent", "10", "--port", "9000-8000"]), "inverted");
    refused(&d, &with(&["--percent", "101"]), "at most 100");
    refused(&d, &with(&["--percent", "-5"]), "above 0");
    refused(&d, &with(&["--percent", "10", "--correlation", "150"]), "correlation 150 is outside 0..100");
    refused(&d, &with(&["--percent", "10", "--peer", "10.0.0.300/24"]), "malformed peer");
    refused(&d, &with(&["--percent", "10", "--duration", "0s"]), "duration 0");
    let delay = ["inject", "network", "delay", "--netns", "n1"];
    let d_with = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v: Vec<&'static str> = delay.to_vec();
        v.extend_from_slice(extra);
        v
    };
    refused(&d, &d_with(&["--jitter", "10ms"]), "jitter without latency");
    refused(&d, &d_with(&["--latency=-10ms"]), "must not be negative");
    refused(&d, &d_with(&["--latency", "2h"]), "absurd");
    refused(&d, &["inject", "stress", "cpu", "--cgroup", "/tmp/not-a-cgroup", "--load", "50"], "under /sys/fs/cgroup");
    refused(&d, &["inject", "stress", "cpu", "--host", "--load", "0"], "load 0 is outside 1..100");
    refused(&d, &["inject", "stress", "cpu", "--host", "--load", "101"], "load 101");
    refused(&d, &["inject", "stress", "cpu", "--host", "--workers", "0"], "workers must be at least 1");
    refused(&d, &["inject", "stress", "memory", "--host", "--size", "0"], "size must be above 0");
    refused(&d, &["inject", "process", "kill", "--pid", "1", "--signal", "NOPE"], "unknown signal 'NOPE'");
    refused(&d, &["inject", "network", "loss", "--cgroup", "/sys/fs/cgroup/x", "--percent", "5"], "cannot target");
    refused(&d, &["recover", "deadbeef"], "no experiment with id 'deadbeef'");
    refused(&d, &["get", "deadbeef"], "no experiment with id 'deadbeef'");

    // Nothing was started by any of these.
    let list = d.ctl_json(&["list", "--all"]);
    let started: Vec<_> = list.as_array().unwrap().iter().filter(|e| e["state"] != "failed").collect();
    assert!(started.is_empty(), "bad requests left experiments: {started:?}");
}

#[test]
fn usage_errors_exit_2_before_reaching_the_daemon() {
    require_root();
    let d = Daemon::start();
    for (args, expect) in [
        (vec!["inject", "network", "loss", "--percent", "5"], "required arguments"),
        (vec!["inject", "network", "loss", "--netns", "a", "--pid", "3", "--percent", "5"], "cannot be used with"),
        (vec!["inject", "network", "delay", "--netns", "a", "--latency", "10"], "no unit"),
        (vec!["inject", "network", "bandwidth", "--netns", "a", "--rate", "fast"], "not a rate"),
        (vec!["recover"], "required"),
    ] {
        let out = d.ctl(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(expect), "{args:?}: {}", text(&out.stderr));
    }
}
