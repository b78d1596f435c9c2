//! Plan errors: each names where and what was expected, before anything runs.

use super::{check, plan};

const GOOD: &str = r#"
name = "t"
[sut]
kind = "local"
nodes = 3
[workload]
publishers = [{ node = "n1", count = 2 }]
subscribers = [{ node = "n3", count = 2 }]
rate = 50
qos_mix = { qos0 = 20, qos1 = 60, qos2 = 20 }
[thresholds]
max_recovery = "30s"
[[case]]
name = "loss"
baseline = "5s"
fault_time = "10s"
recovery = "10s"
[[case.fault]]
kind = "loss"
target = "n2"
ports = [1883]
percent = 20
[case.thresholds]
max_p99_during_ms = 500
"#;

fn load(text: &str) -> Result<plan::Plan, String> {
    let mut p = plan::parse("plan.toml", text)?;
    plan::read_faults("plan.toml", text, &mut p)?;
    check::check(&p)?;
    Ok(p)
}

fn err(text: &str) -> String {
    load(text).expect_err("the plan must be refused")
}

#[test]
fn a_good_plan_loads_with_merged_thresholds() {
    let p = load(GOOD).unwrap();
    // The [[case.fault]] header line.
    assert_eq!(p.cases[0].faults[0].line, 18);
    let th = p.thresholds.merged(&p.cases[0].thresholds);
    assert_eq!(th.max_lost_qos1, Some(0));
    assert_eq!(th.max_p99_during_ms, Some(500.0));
    assert_eq!(th.max_recovery, Some(std::time::Duration::from_secs(30)));
}

#[test]
fn syntax_and_unknown_keys_name_line_and_column() {
    let e = err(&GOOD.replace("rate = 50", "rate = 50\nratee = 3"));
    assert!(e.starts_with("plan.toml:10:1:") && e.contains("unknown field `ratee`"), "{e}");
    let e = err(&GOOD.replace("baseline = \"5s\"", "baseline = 5"));
    assert!(e.contains("plan.toml:15:") && e.contains("expected a string"), "{e}");
    let e = err(&GOOD.replace("percent = 20", "percnt = 20"));
    assert!(e.contains("plan.toml:18:") && e.contains("percnt"), "{e}");
    let e = err(&GOOD.replace("kind = \"loss\"", "kind = \"melt\""));
    assert!(e.contains("plan.toml:18:") && e.contains("unknown variant `melt`"), "{e}");
    let e = err(&GOOD.replace("baseline = \"5s\"", "baseline = \"5 parsecs\""));
    assert!(e.contains("plan.toml:15:") && e.contains("unit"), "{e}");
}

#[test]
fn an_attached_node_names_its_chaosd_over_tls() {
    let attach = |chaosd: &str| {
        GOOD.replace(
            "kind = \"local\"\nnodes = 3",
            &format!(
                "kind = \"attach\"\n[[sut.node]]\nname = \"n1\"\nmqtt = \"127.0.0.1:1883\"\n{chaosd}\n\
                 [[sut.node]]\nname = \"n2\"\nmqtt = \"127.0.0.1:1884\"\n[[sut.node]]\nname = \"n3\"\n\
                 mqtt = \"127.0.0.1:1885\""
            ),
        )
    };
    let good = r#"chaosd = { endpoint = "https://10.0.0.1:7443", ca = "ca.pem", cert = "r.pem", key = "r.key" }"#;
    let p = load(&attach(good)).unwrap();
    let plan::Sut::Attach { nodes, .. } = &p.sut else { panic!("attach") };
    assert_eq!(nodes[0].chaosd.as_ref().unwrap().endpoint, "https://10.0.0.1:7443");
    assert!(nodes[1].chaosd.is_none());
    // `sut` is an internally tagged enum, which serde reads through a
    // buffer without positions: like every key of the SUT, the error names
    // the [sut] table (line 3).
    let e = err(&attach(&good.replace("https://10.0.0.1:7443", "http://10.0.0.1:7443")));
    assert!(e.starts_with("plan.toml:3:1:") && e.contains("TLS only"), "{e}");
    let e = err(&attach(&good.replace("https://10.0.0.1:7443", "https://10.0.0.1")));
    assert!(e.starts_with("plan.toml:3:1:") && e.contains("give the port"), "{e}");
    let e = err(&attach(&good.replace("key = ", "kye = ")));
    assert!(e.starts_with("plan.toml:3:1:") && e.contains("kye"), "{e}");
    let e = err(&attach(&good.replace(", key = \"r.key\"", "")));
    assert!(e.starts_with("plan.toml:3:1:") && e.contains("missing field `key`"), "{e}");
}

#[test]
fn meaning_errors_name_the_case_and_the_fix() {
    let e = err(&GOOD.replace("ports = [1883]", "ports = [0]"));
    assert!(e.contains("case 'loss'") && e.contains("line 18") && e.contains("port 0"), "{e}");
    let e = err(&GOOD.replace("target = \"n2\"", "target = \"n4\""));
    assert!(e.contains("'n4' is not in the SUT") && e.contains("n1, n2, n3"), "{e}");
    let e = err(&GOOD.replace("percent = 20", "percent = 120"));
    assert!(e.contains("percent 120 is out of range"), "{e}");
    let e = err(&GOOD.replace("percent = 20", "percent = 20\nduration = \"11s\""));
    assert!(e.contains("longer than the case's fault_time"), "{e}");
    let e = err(&GOOD.replace("subscribers = [{ node = \"n3\"", "subscribers = [{ node = \"n7\""));
    assert!(e.contains("workload.subscribers: node 'n7' is not in the SUT"), "{e}");
    let e = err(&GOOD.replace("qos2 = 20 }", "qos2 = 30 }"));
    assert!(e.contains("adds up to 110"), "{e}");
    let e = err(&GOOD.replace("max_p99_during_ms = 500", "min_throughput_ratio = 70"));
    assert!(e.contains("min_throughput_ratio 70 is out of range"), "{e}");
    let e = err(&GOOD.replace("kind = \"loss\"", "kind = \"cpu\"\nload = 50").replace("percent = 20\n", ""));
    assert!(e.contains("network faults only"), "{e}");
}

#[test]
fn faults_chaosd_does_not_have_yet_are_kept() {
    let p = load(&GOOD.replace(
        "kind = \"loss\"\ntarget = \"n2\"\nports = [1883]\npercent = 20",
        "kind = \"clock\"\ntarget = \"n1\"\nskew = \"5s\"",
    ))
    .unwrap();
    assert!(matches!(&p.cases[0].faults[0].action, plan::Action::NotYet { params, .. } if params.contains_key("skew")));
    assert_eq!(p.cases[0].faults[0].action.name(), "clock");
}

#[test]
fn shipped_plans_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plans");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "toml") {
            super::load(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 3, "expected quick, seed-plan and example in {}", dir.display());
}

mod judging {
    use mqtt_workload::{Summary, Window, stats::Latency};

    use super::super::exec::{CaseRun, FaultRun};
    use super::super::plan::Thresholds;
    use super::super::report;
    use super::super::verdict::{Verdict, judge};

    fn summary(f: impl Fn(u64, &mut Window)) -> Summary {
        let windows: Vec<Window> = (0..30)
            .map(|t| {
                let mut w = Window {
                    t,
                    sent: [0, 10, 0],
                    expected: [0, 10, 0],
                    received: [0, 10, 0],
                    lost: Some([0; 3]),
                    last_arrival_of_sent: [None, Some(t as f64 + 0.01), None],
                    latency_ms: Some(Latency { p50: 1.0, p95: 2.0, p99: 2.0, max: 3.0 }),
                    ..Window::default()
                };
                f(t, &mut w);
                w
            })
            .collect();
        let n = windows.len();
        Summary {
            start_unix_ms: 0,
            windows,
            qos: Default::default(),
            total: Default::default(),
            window_s: 30.0,
            publisher_reconnects: 0,
            subscriber_reconnects: 0,
            subscribed: 1,
            latency_us: Default::default(),
            latency_by_send_second: vec![vec![2000; 10]; n],
        }
    }

    fn run(matched: u64) -> CaseRun {
        CaseRun {
            name: "c".into(),
            baseline: (0.0, 10.0),
            fault: (10.0, 20.0),
            recovery: (20.0, 30.0),
            faults: vec![FaultRun {
                kind: "partition".into(),
                node: "n2".into(),
                line: 1,
                experiment_id: Some("e1".into()),
                summary: String::new(),
                injected_at: Some(10.0),
                recovered_at: Some(20.0),
                counters: serde_json::json!({ "packets_matched": matched }),
                no_evidence: (matched == 0).then(|| "the partition fault matched no packet".to_string()),
                not_run: None,
            }],
            events: vec![],
            scrapes: vec![],
            nodes_down_at_end: vec![],
            aborted: None,
        }
    }

    fn th() -> Thresholds {
        Thresholds { max_recovery: Some(std::time::Duration::from_secs(5)), ..Default::default() }
            .merged(&Default::default())
    }

    #[test]
    fn measured_and_met_is_a_pass_with_an_rto() {
        let r = judge(run(5), th(), &summary(|_, _| {}));
        assert_eq!(r.verdict, Verdict::Pass, "{:?}", r.reasons);
        let rto = r.metrics.rto_s.unwrap();
        assert!((0.0..1.0).contains(&rto), "{rto}");
        assert_eq!(r.windows.len(), 30);
    }

    #[test]
    fn nothing_sent_is_unknown_never_a_pass() {
        let r = judge(
            run(5),
            th(),
            &summary(|_, w| {
                w.sent = [0; 3];
                w.received = [0; 3];
                w.expected = [0; 3];
                w.last_arrival_of_sent = [None; 3];
            }),
        );
        assert_eq!(r.verdict, Verdict::Unknown);
        assert!(r.reasons.iter().any(|x| x.contains("nothing was sent during the baseline")), "{:?}", r.reasons);
        let r = judge(run(0), th(), &summary(|_, _| {}));
        assert_eq!(r.verdict, Verdict::Unknown);
        assert!(r.reasons[0].contains("matched no packet"), "{:?}", r.reasons);
    }

    #[test]
    fn a_lost_qos1_message_fails_and_leaves_no_rto() {
        let r = judge(
            run(5),
            th(),
            &summary(|t, w| {
                if t == 15 {
                    w.lost = Some([0, 1, 0])
                }
            }),
        );
        assert_eq!(r.verdict, Verdict::Fail);
        assert!(r.reasons.iter().any(|x| x.contains("lost 1 QoS 1")), "{:?}", r.reasons);
        assert!(r.reasons.iter().any(|x| x.contains("did not recover")), "{:?}", r.reasons);
        assert_eq!(r.metrics.rto_s, None);
    }

    #[test]
    fn the_chart_has_the_fault_window_and_a_point_per_second() {
        let r = judge(run(5), th(), &summary(|_, _| {}));
        let svg = report::svg(&r);
        assert_eq!(svg.matches("class=\"fault-window\"").count(), 1);
        assert_eq!(svg.matches("class=\"point-qos1\"").count(), 30);
        assert!(svg.contains("class=\"recovery-point\""));
    }
}

/// A node on a host of its own (its own chaosd, no netns, the broker known
/// by name) takes network faults in that host's namespace and kill by
/// process name; a node with neither netns nor chaosd is refused.
#[test]
fn a_node_on_its_own_host_is_targeted_by_host_and_process_name() {
    use chaos_proto::chaosd::v1::target::Kind;
    let text = GOOD.replace(
        "kind = \"local\"\nnodes = 3",
        "kind = \"attach\"\n[[sut.node]]\nname = \"n1\"\nmqtt = \"127.0.0.1:1883\"\n[[sut.node]]\nname = \"n2\"\n\
         mqtt = \"10.0.0.2:1883\"\nprocess = \"broker\"\n\
         chaosd = { endpoint = \"https://10.0.0.2:7443\", ca = \"ca.pem\", cert = \"r.pem\", key = \"r.key\" }\n\
         [[sut.node]]\nname = \"n3\"\nmqtt = \"127.0.0.1:1885\"",
    ) + "[[case]]\nname = \"kill\"\nbaseline = \"5s\"\nfault_time = \"5s\"\nrecovery = \"10s\"\n\
         [[case.fault]]\nkind = \"kill\"\ntarget = \"n2\"\nsignal = \"KILL\"\n";
    let p = load(&text).unwrap();
    let sut = super::sut::start(&p, std::path::Path::new("/nonexistent")).unwrap();
    let (n1, n2) = (&sut.nodes[0], &sut.nodes[1]);
    let hold = std::time::Duration::from_secs(10);
    let loss = &p.cases[0].faults[0];
    let kill = &p.cases[1].faults[0];
    let target = |r: Result<chaos_proto::chaosd::v1::InjectRequest, String>| r.unwrap().target.unwrap().kind.unwrap();
    assert_eq!(target(super::inject::request(loss, n2, &sut.nodes, hold)), Kind::Host(Default::default()));
    assert_eq!(target(super::inject::request(kill, n2, &sut.nodes, hold)), Kind::ProcessName("broker".into()));
    let e = super::inject::request(loss, n1, &sut.nodes, hold).unwrap_err();
    assert!(e.contains("node n1 has no netns") && e.contains("own chaosd"), "{e}");
    let e = super::inject::request(kill, n1, &sut.nodes, hold).unwrap_err();
    assert!(e.contains("or process name"), "{e}");
}
