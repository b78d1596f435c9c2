//! The shipped monitoring (scripts/monitoring/) against the real thing:
//! promtool accepts the scrape configuration and the rules (and the rules'
//! unit tests pass); Debian's Prometheus, run with that configuration
//! adapted to loopback, scrapes a three-node broker cluster carrying MQTT
//! traffic and a chaosd with `--metrics-listen`; after faults injected with
//! chaosctl, every query of the Grafana dashboard (panels and annotations)
//! has data, and an experiment's series end with it.
//!
//! Needs root and Debian's `prometheus` package (scripts/setup.sh installs
//! it); fails saying so when either is missing.

mod common;
mod net_support;

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{Daemon, chaosd, require_root};
use net_support::{Topo, sa, udp_blast};
use serde_json::Value;

/// A child process killed and reaped on drop (also when the test panics).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> Proc {
    let log = fs::File::create(log).unwrap();
    Proc(cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().expect("spawn"))
}

fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()))
        .unwrap_or_else(|| {
            panic!(
                "{name} is not on PATH: this test needs Debian's prometheus package (with promtool); \
                 run scripts/setup.sh, which installs it, or apt-get install prometheus"
            )
        })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/monitoring")
}

fn promtool(args: &[&str]) {
    let out = Command::new(tool("promtool")).args(args).output().expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Percent-encodes a query string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// GET over HTTP/1.0 on loopback: (status code, body); None when nothing answers.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// The samples an instant query returns.
fn query(prom: SocketAddr, q: &str) -> Vec<Value> {
    let (code, body) = get(prom, &format!("/api/v1/query?query={}", encode(q)))
        .unwrap_or_else(|| panic!("Prometheus does not answer"));
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("query {q}: {e}: {body}"));
    assert_eq!(code, 200, "query {q}: {body}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn finite(sample: &Value) -> Option<f64> {
    sample["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).filter(|v| v.is_finite())
}

/// Whether the query returns at least one finite sample.
fn has_data(prom: SocketAddr, q: &str) -> bool {
    query(prom, q).iter().any(|s| finite(s).is_some())
}

fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        thread::sleep(Duration::from_millis(250));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// Every PromQL expression of the dashboard: panel targets and annotations.
fn dashboard_queries() -> Vec<String> {
    let text = fs::read_to_string(monitoring_dir().join("grafana-dashboard.json")).expect("read the dashboard");
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&dash, &mut out);
    assert!(out.len() >= 10, "the dashboard has only {} queries", out.len());
    out
}

/// The shipped scrape configuration, pointed at this test's ports. Every
/// address it replaces must be in the file, or the test would check
/// something else than what is shipped.
fn adapt_config(brokers: &[u16; 3], chaosd: u16) -> String {
    let dir = monitoring_dir();
    let mut text = fs::read_to_string(dir.join("prometheus.yml")).expect("read prometheus.yml");
    let mut swap = |from: &str, to: &str| {
        assert!(text.contains(from), "scripts/monitoring/prometheus.yml no longer contains {from:?}");
        text = text.replace(from, to);
    };
    for (i, port) in brokers.iter().enumerate() {
        swap(&format!("10.231.0.{}:9100", i + 1), &format!("127.0.0.1:{port}"));
    }
    swap("127.0.0.1:9464", &format!("127.0.0.1:{chaosd}"));
    swap("scrape_interval: 5s", "scrape_interval: 1s");
    swap("evaluation_interval: 5s", "evaluation_interval: 1s");
    swap("  - rules.yml", &format!("  - {}", dir.join("rules.yml").canonicalize().unwrap().display()));
    text
}

fn metrics_text(addr: SocketAddr) -> String {
    let (code, body) = get(addr, "/metrics").expect("chaosd's metrics listener answers");
    assert_eq!(code, 200, "{body}");
    body
}

fn inject_loss(d: &Daemon, topo: &Topo) -> String {
    let out = d.ctl_json(&[
        "inject",
        "network",
        "loss",
        "--netns",
        &topo.a,
        "--device",
        "va",
        "--protocol",
        "udp",
        "--dport",
        "5555",
        "--percent",
        "50",
        "--duration",
        "2m",
    ]);
    out["id"].as_str().unwrap_or_else(|| panic!("no id in {out}")).to_string()
}

#[test]
fn prometheus_scrapes_the_cluster_and_chaosd_with_the_shipped_configuration() {
    require_root();
    let (prometheus, _) = (tool("prometheus"), tool("promtool"));
    let dir = monitoring_dir();
    let shipped = |f: &str| dir.join(f).to_str().unwrap().to_string();
    promtool(&["check", "config", &shipped("prometheus.yml")]);
    promtool(&["check", "rules", &shipped("rules.yml")]);
    promtool(&["test", "rules", &shipped("rules-test.yml")]);

    let tmp = tempfile::tempdir().unwrap();
    let broker = chaosd().with_file_name("broker");
    assert!(broker.exists(), "{} is missing: build the workspace first (cargo build --workspace)", broker.display());

    // Three broker nodes on loopback, n2 and n3 joining n1.
    let mqtt = [free_port(), free_port(), free_port()];
    let http = [free_port(), free_port(), free_port()];
    let cluster = [free_port(), free_port(), free_port()];
    let mut nodes = Vec::new();
    for i in 0..3 {
        let mut cmd = Command::new(&broker);
        cmd.args(["--node-name", &format!("n{}", i + 1)])
            .args(["--mqtt-listen", &format!("127.0.0.1:{}", mqtt[i])])
            .args(["--http-listen", &format!("127.0.0.1:{}", http[i])])
            .args(["--cluster-listen", &format!("127.0.0.1:{}", cluster[i])]);
        if i > 0 {
            cmd.args(["--join", &format!("127.0.0.1:{}", cluster[0])]);
        }
        nodes.push(spawn(&mut cmd, &tmp.path().join(format!("n{}.log", i + 1))));
    }
    let n1_http: SocketAddr = format!("127.0.0.1:{}", http[0]).parse().unwrap();
    wait_for(Duration::from_secs(20), "n1 to see n2 and n3 up", || {
        get(n1_http, "/cluster")
            .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
            .and_then(|v| v["members"].as_array().map(|m| m.iter().filter(|p| p["state"] == "up").count()))
            == Some(2)
    });

    let metrics_port = free_port();
    let metrics_addr: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let d = Daemon::start_with(&["--metrics-listen", &metrics_addr.to_string()]);
    let topo = Topo::new();

    // A second daemon asking for the same port stops at once, with one
    // line, before it creates or locks anything.
    let other = tmp.path().join("other");
    let bpf_dir = PathBuf::from(format!("/sys/fs/bpf/chaosd-monitoring-{}", std::process::id()));
    let out = Command::new(chaosd())
        .args(["serve", "--socket"])
        .arg(other.join("run/chaosd.sock"))
        .arg("--state-dir")
        .arg(other.join("state"))
        .arg("--bpf-dir")
        .arg(&bpf_dir)
        .args(["--metrics-listen", &metrics_addr.to_string()])
        .output()
        .expect("run chaosd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim(),
        format!(
            "chaosd: cannot serve metrics on {metrics_addr}: the address is already in use; stop what listens there or pass another --metrics-listen ADDR:PORT"
        )
    );
    assert!(!other.exists() && !bpf_dir.exists(), "a refused start created files");

    let config = tmp.path().join("prometheus.yml");
    fs::write(&config, adapt_config(&http, metrics_port)).unwrap();
    promtool(&["check", "config", config.to_str().unwrap()]);
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _prometheus = spawn(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", tmp.path().join("tsdb").display()))
            .arg(format!("--web.listen-address={web}"))
            .arg("--log.level=warn"),
        &tmp.path().join("prometheus.log"),
    );
    wait_for(Duration::from_secs(20), "every target scraped (up == 1 for 3 brokers and chaosd)", || {
        get(web, "/-/ready").is_some_and(|(c, _)| c == 200) && query(web, "up == 1").len() == 4
    });

    // Cross-node MQTT traffic at QoS 1 and 2: publishers on n1, subscribers on n2.
    let _bench = spawn(
        Command::new(&broker)
            .args(["bench", "--addr", &format!("127.0.0.1:{}", mqtt[0])])
            .args(["--sub-addr", &format!("127.0.0.1:{}", mqtt[1])])
            .args(["--publishers", "2", "--subscribers", "2", "--rate", "50", "--qos-mix", "0/50/50"])
            .args(["--duration", "40", "--drain", "1", "--prefix", "monitoring"]),
        &tmp.path().join("bench.log"),
    );

    // A first fault, its packets, its recovery; then a second one that stays.
    let first = inject_loss(&d, &topo);
    let target = sa(topo.ip_b(false), 5555);
    let received = udp_blast(&topo.a, &topo.b, target, 200, || 0);
    assert!(received < 200, "50% loss let all 200 datagrams through");
    let scraped = metrics_text(metrics_addr);
    assert!(
        scraped.contains(&format!(
            "chaosd_experiment_active{{id=\"{first}\",kind=\"loss\",target=\"netns {}\"}} 1",
            topo.a
        )),
        "no active series for {first}:\n{scraped}"
    );
    wait_for(Duration::from_secs(15), "Prometheus to hold the first fault's dropped packets", || {
        query(web, &format!("chaosd_experiment_packets_dropped_total{{id=\"{first}\"}} > 0")).len() == 1
    });
    d.ctl_ok(&["recover", &first]);
    let second = inject_loss(&d, &topo);
    udp_blast(&topo.a, &topo.b, target, 200, || 0);
    let scraped = metrics_text(metrics_addr);
    assert!(!scraped.contains(&first), "the recovered experiment {first} still has series:\n{scraped}");
    assert!(scraped.contains("chaosd_recoveries_total{kind=\"loss\",result=\"recovered\"} 1"), "{scraped}");
    assert!(scraped.contains("chaosd_injections_total{kind=\"loss\",result=\"ok\"} 2"), "{scraped}");

    // Every query of the dashboard has data.
    let queries = dashboard_queries();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let missing: Vec<&String> = queries.iter().filter(|q| !has_data(web, q)).collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "dashboard queries without data after 30 s:\n{}\nprometheus log:\n{}",
                missing.iter().map(|q| format!("  {q}")).collect::<Vec<_>>().join("\n"),
                fs::read_to_string(tmp.path().join("prometheus.log")).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(500));
    }
    assert!(query(web, "chaosd_experiment_active").iter().all(|s| s["metric"]["id"] == second.as_str()));
    let rules = get(web, "/api/v1/rules").expect("rules").1;
    for group in ["broker-recording", "chaosd-recording", "seed-plan-criteria"] {
        assert!(rules.contains(&format!("\"name\":\"{group}\"")), "rule group {group} not loaded: {rules}");
    }

    // The second fault ends: its series go with it.
    d.ctl_ok(&["recover", &second]);
    let scraped = metrics_text(metrics_addr);
    assert!(!scraped.contains(&second), "the recovered experiment {second} still has series:\n{scraped}");
    wait_for(Duration::from_secs(10), "Prometheus to mark the ended fault's series stale", || {
        query(web, "chaosd_experiment_active").is_empty()
    });
}
