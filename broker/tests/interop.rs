//! Interop with clients we did not write: Debian's mosquitto_pub/mosquitto_sub
//! and Python paho-mqtt 1.6, both for MQTT 3.1.1 and 5.0. Missing tools make
//! these tests fail with the package to install.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const VERSIONS: [&str; 2] = ["mqttv311", "mqttv5"];

/// Waits until the broker reports at least `n` subscriptions.
async fn wait_subs(b: &TestBroker, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http_get(b.http, "/metrics");
        if metric(&body, "broker_subscriptions{node=\"test\"}") >= n {
            return;
        }
        assert!(Instant::now() < deadline, "subscriptions did not reach {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sub_cmd(b: &TestBroker, v: &str, args: &[&str]) -> ChildGuard {
    let child = Command::new(tool("mosquitto_sub"))
        .args(["-h", "127.0.0.1", "-p", &b.addr.port().to_string(), "-V", v])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mosquitto_sub");
    ChildGuard(child)
}

fn mpub(b: &TestBroker, v: &str, args: &[&str]) {
    let child = Command::new(tool("mosquitto_pub"))
        .args(["-h", "127.0.0.1", "-p", &b.addr.port().to_string(), "-V", v])
        .args(args)
        .spawn()
        .expect("run mosquitto_pub");
    // Bounded: a broker that never answers must fail the test, not hang it.
    let mut g = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        if let Some(st) = g.0.try_wait().expect("try_wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "mosquitto_pub {args:?} did not finish");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(st.success(), "mosquitto_pub {args:?} failed: {st}");
}

/// Waits (bounded) for a child to exit and returns its stdout.
async fn output(mut g: ChildGuard, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = g.0.try_wait().expect("try_wait") {
            let mut out = String::new();
            if let Some(mut so) = g.0.stdout.take() {
                use std::io::Read;
                so.read_to_string(&mut out).expect("read stdout");
            }
            assert!(st.success() || st.code() == Some(27), "mosquitto_sub exited with {st}: {out}");
            return out;
        }
        assert!(Instant::now() < deadline, "mosquitto_sub did not finish within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_qos_retained_will_persistent() {
    let b = start(|_| {}).await;
    for v in VERSIONS {
        // QoS 0/1/2, delivered at min(publish, subscription) QoS.
        let s = sub_cmd(&b, v, &["-t", "m/#", "-q", "2", "-C", "3", "-F", "%t %q %p"]);
        wait_subs(&b, 1.0).await;
        for q in ["0", "1", "2"] {
            mpub(&b, v, &["-t", &format!("m/{q}"), "-m", &format!("p{q}"), "-q", q]);
        }
        let out = output(s, Duration::from_secs(10)).await;
        assert_eq!(out.lines().collect::<Vec<_>>(), vec!["m/0 0 p0", "m/1 1 p1", "m/2 2 p2"], "{v}");
        wait_subs_zero(&b).await;

        // Retained: set, replace, delivered on subscribe with the flag; cleared by a null message.
        mpub(&b, v, &["-t", "mr/a", "-m", "one", "-r", "-q", "1"]);
        mpub(&b, v, &["-t", "mr/a", "-m", "two", "-r", "-q", "1"]);
        let s = sub_cmd(&b, v, &["-t", "mr/#", "-C", "1", "-F", "%t %r %p"]);
        assert_eq!(output(s, Duration::from_secs(10)).await.trim(), "mr/a 1 two", "{v}");
        mpub(&b, v, &["-t", "mr/a", "-r", "-n"]);
        let s = sub_cmd(&b, v, &["-t", "mr/#", "-W", "1", "-F", "%t %p"]);
        assert_eq!(output(s, Duration::from_secs(10)).await.trim(), "", "{v}: retained not cleared");
        wait_subs_zero(&b).await;

        // Will: a killed client's will reaches a watcher.
        let watcher = sub_cmd(&b, v, &["-t", "mw/#", "-C", "1", "-F", "%t %p"]);
        let dying = sub_cmd(
            &b,
            v,
            &["-t", "never", "--will-topic", "mw/x", "--will-payload", "bye", "-i", &format!("dying-{v}")],
        );
        wait_subs(&b, 2.0).await;
        drop(dying);
        assert_eq!(output(watcher, Duration::from_secs(10)).await.trim(), "mw/x bye", "{v}");
        wait_subs_zero(&b).await;

        // Persistent session: queued while offline, delivered on return.
        let id = format!("mps-{v}");
        let mut pers = vec!["-c", "-i", id.as_str(), "-q", "1", "-t", "ps/#", "-F", "%t %p"];
        if v == "mqttv5" {
            pers.extend(["-x", "300"]);
        }
        let s = sub_cmd(&b, v, &pers);
        wait_subs(&b, 1.0).await;
        drop(s);
        for i in 0..3 {
            mpub(&b, v, &["-t", "ps/t", "-m", &format!("q{i}"), "-q", "1"]);
        }
        let mut again = pers.clone();
        again.extend(["-C", "3"]);
        let s = sub_cmd(&b, v, &again);
        assert_eq!(
            output(s, Duration::from_secs(10)).await.lines().collect::<Vec<_>>(),
            vec!["ps/t q0", "ps/t q1", "ps/t q2"],
            "{v}"
        );
        // End the session so the next round starts clean.
        let mut end = vec!["-i", id.as_str(), "-t", "ps/#", "-W", "1"];
        if v == "mqttv5" {
            end.extend(["-x", "0"]);
        }
        let _ = output(sub_cmd(&b, v, &end), Duration::from_secs(10)).await;
        wait_subs_zero(&b).await;
    }
}

async fn wait_subs_zero(b: &TestBroker) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http_get(b.http, "/metrics");
        if metric(&body, "broker_subscriptions{node=\"test\"}") == 0.0 {
            return;
        }
        assert!(Instant::now() < deadline, "subscriptions did not go back to 0");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_v5_properties() {
    let b = start(|_| {}).await;
    let s = sub_cmd(&b, "mqttv5", &["-t", "f/#", "-q", "1", "-C", "1", "-F", "%t|%q|%p|%P|%C|%R|%E"]);
    wait_subs(&b, 1.0).await;
    mpub(
        &b,
        "mqttv5",
        &[
            "-t",
            "f/x",
            "-m",
            "hi",
            "-q",
            "1",
            "-D",
            "publish",
            "user-property",
            "k",
            "v",
            "-D",
            "publish",
            "content-type",
            "text/plain",
            "-D",
            "publish",
            "response-topic",
            "r/t",
            "-D",
            "publish",
            "message-expiry-interval",
            "60",
        ],
    );
    let out = output(s, Duration::from_secs(10)).await;
    let f: Vec<&str> = out.trim().split('|').collect();
    assert_eq!(&f[..6], &["f/x", "1", "hi", "k:v", "text/plain", "r/t"], "{out}");
    let expiry: u32 = f[6].parse().expect("expiry");
    assert!(expiry > 0 && expiry <= 60, "{out}");
}

fn paho(port: u16, version: &str) {
    let py = python_paho();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/paho_check.py");
    let mut child = ChildGuard(
        Command::new(py)
            .arg(&script)
            .args(["127.0.0.1", &port.to_string(), version])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn python3"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        if let Some(st) = child.0.try_wait().expect("try_wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "paho_check.py {version} timed out");
        std::thread::sleep(Duration::from_millis(50));
    };
    use std::io::Read;
    let (mut out, mut err) = (String::new(), String::new());
    child.0.stdout.take().expect("stdout").read_to_string(&mut out).expect("read");
    child.0.stderr.take().expect("stderr").read_to_string(&mut err).expect("read");
    assert!(st.success() && out.contains("ALL OK"), "paho {version} failed ({st}):\n{out}\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_mqtt_v311() {
    let b = start(|_| {}).await;
    let port = b.addr.port();
    tokio::task::spawn_blocking(move || paho(port, "3")).await.expect("paho run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_mqtt_v5() {
    let b = start(|_| {}).await;
    let port = b.addr.port();
    tokio::task::spawn_blocking(move || paho(port, "5")).await.expect("paho run");
}
