use super::*;
use crate::display::{fmt_pct, signal_name};

fn net(action: pb::network_action::Kind, selector: pb::Selector) -> Option<pb::Fault> {
    Some(pb::Fault {
        kind: Some(pb::fault::Kind::Network(pb::NetworkFault {
            selector: Some(selector),
            action: Some(pb::NetworkAction { kind: Some(action) }),
        })),
    })
}

fn loss(p: f64) -> pb::network_action::Kind {
    pb::network_action::Kind::Loss(pb::Loss { percent: p, correlation_percent: 0.0 })
}

fn err_of(f: Option<pb::Fault>) -> String {
    match fault_from_pb(f, &Target::NetnsName("n".into())) {
        Err(ApiError::InvalidArgument(m)) => m,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

fn ms(ms: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds: 0, nanos: ms * 1_000_000 })
}

#[test]
fn bad_ports_are_refused_with_what_was_wrong() {
    let sel = |first, last| pb::Selector { ports: vec![pb::PortRange { first, last }], ..Default::default() };
    assert!(err_of(net(loss(10.0), sel(0, 0))).contains("0 is not a port"));
    assert!(err_of(net(loss(10.0), sel(70000, 70000))).contains("70000 is not a port"));
    assert!(err_of(net(loss(10.0), sel(9000, 8000))).contains("inverted"));
}

#[test]
fn a_rule_the_classifier_cannot_hold_is_refused_at_conversion() {
    let r = |first, last| vec![pb::PortRange { first, last }];
    // Three port lists: the classifier combines at most two.
    let three =
        pb::Selector { ports: r(80, 80), source_ports: r(81, 81), destination_ports: r(82, 82), ..Default::default() };
    assert!(err_of(net(loss(10.0), three)).contains("at most two"));
    let icmp = pb::Selector { protocol: pb::Protocol::Icmp as i32, ports: r(80, 80), ..Default::default() };
    assert!(err_of(net(loss(10.0), icmp)).contains("ICMP has no ports"));
}

#[test]
fn bad_percentages_latencies_and_peers_are_refused() {
    assert!(err_of(net(loss(0.0), Default::default())).contains("above 0"));
    assert!(err_of(net(loss(101.0), Default::default())).contains("at most 100"));
    assert!(err_of(net(loss(f64::NAN), Default::default())).contains("NaN"));
    let delay = |latency, jitter| {
        pb::network_action::Kind::Delay(pb::Delay { latency, jitter, correlation_percent: 0.0, distribution: 0 })
    };
    assert!(err_of(net(delay(None, ms(10)), Default::default())).contains("jitter without latency"));
    assert!(
        err_of(net(delay(Some(prost_types::Duration { seconds: -1, nanos: 0 }), None), Default::default()))
            .contains("negative")
    );
    assert!(
        err_of(net(delay(Some(prost_types::Duration { seconds: 3600, nanos: 0 }), None), Default::default()))
            .contains("absurd")
    );
    let peers = pb::Selector { peers: vec!["10.0.0.0/33".into()], ..Default::default() };
    assert!(err_of(net(loss(5.0), peers)).contains("malformed peer"));
}

#[test]
fn peers_are_normalised_and_both_families_accepted() {
    let sel = pb::Selector { peers: vec!["10.77.0.9/24".into(), "fd00:77::1".into()], ..Default::default() };
    let Fault::Network(n) = fault_from_pb(net(loss(5.0), sel), &Target::Host).unwrap() else { panic!() };
    let peers: Vec<String> = n.selector.peers.iter().map(|p| p.to_string()).collect();
    assert_eq!(peers, ["10.77.0.0/24", "fd00:77::1/128"]);
}

#[test]
fn zero_duration_and_wrong_target_kind_are_refused() {
    let zero = prost_types::Duration { seconds: 0, nanos: 0 };
    assert!(matches!(duration_from_pb(Some(&zero)), Err(ApiError::InvalidArgument(m)) if m.contains("duration 0")));
    assert_eq!(duration_from_pb(None).unwrap(), None);
    let err = fault_from_pb(net(loss(5.0), Default::default()), &Target::Cgroup("/sys/fs/cgroup/x".into()));
    assert!(matches!(err, Err(ApiError::InvalidArgument(m)) if m.contains("cannot target")));
}

#[test]
fn shares_below_what_the_datapath_expresses_are_refused_with_the_smallest() {
    let m = err_of(net(loss(1e-300), Default::default()));
    assert!(m.contains("1e-300") && m.contains("0.0000000233"), "{m}");
    assert!("0.0000000233".parse::<f64>().unwrap() >= MIN_PACKET_PERCENT, "the value shown is accepted");
    assert!(fault_from_pb(net(loss(0.0000000233), Default::default()), &Target::Host).is_ok());
    let corr = pb::network_action::Kind::Loss(pb::Loss { percent: 5.0, correlation_percent: 1e-12 });
    assert!(err_of(net(corr, Default::default())).contains("give 0 for none"));
    let dup = pb::network_action::Kind::Duplicate(pb::Duplicate { percent: 1e-9, correlation_percent: 0.0 });
    assert!(err_of(net(dup, Default::default())).contains("smallest share"));
}

#[test]
fn durations_below_a_millisecond_or_beyond_a_week_say_the_limit() {
    let d = |seconds, nanos| duration_from_pb(Some(&prost_types::Duration { seconds, nanos }));
    for nanos in [1, 1_000, 999_999] {
        assert!(matches!(d(0, nanos), Err(ApiError::InvalidArgument(m)) if m.contains("the smallest duration is 1ms")));
    }
    assert_eq!(d(0, 1_000_000).unwrap(), Some(Duration::from_millis(1)));
    assert!(matches!(d(8 * 86_400, 0), Err(ApiError::InvalidArgument(m)) if m.contains("duration 8d is longer")));
    assert!(matches!(d(i64::MAX, 0), Err(ApiError::InvalidArgument(m)) if m.contains("at most 7d")));
    assert!(matches!(d(-1, 0), Err(ApiError::InvalidArgument(m)) if m.contains("negative")));
    assert!(matches!(d(1, 2_000_000_000), Err(ApiError::InvalidArgument(m)) if m.contains("malformed")));
}

#[test]
fn small_shares_are_shown_with_their_digits() {
    assert_eq!(fmt_pct(25.0), "25%");
    assert_eq!(fmt_pct(0.5), "0.5%");
    assert_eq!(fmt_pct(0.005), "0.005%");
    assert_eq!(fmt_pct(MIN_PACKET_PERCENT), "0.0000000233%");
}

#[test]
fn signals_by_name_or_number() {
    assert_eq!(parse_signal("KILL").unwrap(), libc::SIGKILL);
    assert_eq!(parse_signal("sigterm").unwrap(), libc::SIGTERM);
    assert_eq!(parse_signal("15").unwrap(), 15);
    assert!(parse_signal("BOGUS").is_err());
    assert!(parse_signal("99").is_err());
    assert_eq!(signal_name(libc::SIGKILL), "KILL");
}

#[test]
fn cgroup_paths_outside_the_hierarchy_are_refused() {
    for p in ["/tmp/x", "/sys/fs/cgroup/../../etc", "relative"] {
        let t = Some(pb::Target { kind: Some(pb::target::Kind::CgroupPath(p.into())) });
        assert!(matches!(target_from_pb(t), Err(ApiError::InvalidArgument(_))), "{p}");
    }
}
