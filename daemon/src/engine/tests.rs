//! The engine against a scripted driver and a journal in a temporary
//! directory: no root, no kernel. What is checked is what an operator
//! sees (`list`, `get`, the reconcile report) and what the driver was
//! asked to do.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde_json::{Value, json};

use super::*;
use crate::{driver::RecordError, experiment::Counters, spec::ProcessFault};

/// What the scripted driver does, and what it was asked.
#[derive(Default)]
struct Script {
    /// Objects `apply` records before it returns `outcome`.
    records: Vec<Value>,
    /// None: Active.
    outcome: Option<fn() -> Result<Applied, ApiError>>,
    /// Experiments whose target is gone.
    gone: HashSet<String>,
    /// Experiments `adopt` refuses.
    no_adopt: HashSet<String>,
    /// What `sweep` reports it removed.
    sweeps: Vec<String>,
    /// Calls, in order: "apply ID", "revert ID N" (N objects), "adopt ID",
    /// "sweep ID,ID".
    calls: Vec<String>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Script>>);

impl Fake {
    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.0.lock().unwrap()
    }

    fn calls(&self) -> Vec<String> {
        self.script().calls.clone()
    }
}

impl Driver for Fake {
    fn decode(&self, objects: &[Value]) -> Result<(), RecordError> {
        // Only whether it decodes matters.
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Paused {
            #[serde(rename = "paused")]
            _paused: u32,
        }
        crate::driver::decode_records::<Paused>("fake", objects).map(drop)
    }

    fn apply(&self, exp: &Experiment, _ctx: &ApplyContext<'_>, rec: &mut dyn Recorder) -> Result<Applied, ApiError> {
        let mut s = self.script();
        s.calls.push(format!("apply {}", exp.id));
        rec.record_all(s.records.clone())?;
        s.outcome.map_or(Ok(Applied::Active), |f| f())
    }

    fn revert(&self, exp: &Experiment, objects: &[Value]) -> Result<(), Vec<String>> {
        self.script().calls.push(format!("revert {} {}", exp.id, objects.len()));
        Ok(())
    }

    fn counters(&self, _exp: &Experiment, objects: &[Value]) -> Counters {
        Counters { processes_signalled: objects.len() as u32, ..Counters::default() }
    }

    fn liveness(&self, exp: &Experiment, _objects: &[Value]) -> Liveness {
        if self.script().gone.contains(&exp.id) { Liveness::Gone } else { Liveness::Alive }
    }

    fn adopt(&self, exp: &Experiment, _objects: &[Value]) -> Result<(), ApiError> {
        let mut s = self.script();
        s.calls.push(format!("adopt {}", exp.id));
        if s.no_adopt.contains(&exp.id) {
            return Err(ApiError::FailedPrecondition("its objects are gone".into()));
        }
        Ok(())
    }

    fn sweep(&self, known: &[(Experiment, Vec<Value>)]) -> Vec<String> {
        let mut s = self.script();
        let mut ids: Vec<&str> = known.iter().map(|(e, _)| e.id.as_str()).collect();
        ids.sort();
        s.calls.push(format!("sweep {}", ids.join(",")));
        s.sweeps.clone()
    }
}

fn engine(dir: &std::path::Path, boot: &str, fake: &Fake) -> Engine {
    let journal = Journal::open(dir, boot.into()).unwrap();
    Engine::new(
        journal,
        Drivers {
            network: Slot::Unavailable("not in this test".into()),
            stress: Slot::Unavailable("not in this test".into()),
            process: Slot::Ready(Box::new(fake.clone())),
        },
    )
}

fn pause(pid: u32) -> InjectSpec {
    InjectSpec {
        target: Target::Pid(pid),
        fault: Fault::Process(ProcessFault::Pause),
        duration: Some(Duration::from_secs(60)),
        force: false,
    }
}

#[test]
fn an_active_fault_is_journaled_listed_and_reverted_with_its_objects() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    fake.script().records = vec![json!({"paused": 7}), json!({"paused": 8})];
    let e = engine(dir.path(), "b", &fake);
    let exp = e.inject(pause(7)).unwrap();
    assert_eq!(exp.state, State::Active);
    assert_eq!(exp.counters.processes_signalled, 2, "counters read after apply");
    assert_eq!(e.list(false).unwrap().iter().map(|x| x.id.clone()).collect::<Vec<_>>(), vec![exp.id.clone()]);
    let done = e.recover(&exp.id).unwrap();
    assert_eq!(done.state, State::Recovered);
    assert_eq!(fake.calls(), vec![format!("apply {}", exp.id), format!("revert {} 2", exp.id)]);
    assert!(e.list(false).unwrap().is_empty());
    assert_eq!(e.get(&exp.id).unwrap().state, State::Recovered, "the journal keeps the ended experiment");
    let again = e.recover(&exp.id).unwrap_err();
    assert!(matches!(again, ApiError::FailedPrecondition(_)) && again.to_string().contains("already ended"), "{again}");
}

#[test]
fn a_fault_over_once_applied_ends_with_the_drivers_reason() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    fake.script().outcome = Some(|| Ok(Applied::Done { reason: "signal sent to 1 process(es)".into() }));
    let e = engine(dir.path(), "b", &fake);
    let exp = e.inject(pause(7)).unwrap();
    assert_eq!((exp.state, exp.reason.as_str()), (State::Expired, "signal sent to 1 process(es)"));
    assert!(exp.ended_at.is_some());
    assert!(e.list(false).unwrap().is_empty(), "nothing stays active");
    assert_eq!(e.get(&exp.id).unwrap().state, State::Expired);
}

#[test]
fn a_failed_apply_is_reverted_and_kept_as_failed_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    fake.script().records = vec![json!({"paused": 7})];
    fake.script().outcome = Some(|| Err(ApiError::Internal("the kernel said no".into())));
    let e = engine(dir.path(), "b", &fake);
    let err = e.inject(pause(7)).unwrap_err();
    assert_eq!(err.to_string(), "the kernel said no");
    let all = e.list(true).unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!((all[0].state, all[0].reason.as_str()), (State::Failed, "the kernel said no"));
    // What was recorded before the failure was reverted, by the engine too.
    assert_eq!(fake.calls(), vec![format!("apply {}", all[0].id), format!("revert {} 1", all[0].id)]);
    assert!(e.list(false).unwrap().is_empty());
}

#[test]
fn a_refused_request_that_left_nothing_is_not_an_experiment() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    fake.script().outcome = Some(|| Err(ApiError::AlreadyExists("pid 7 is already paused".into())));
    let e = engine(dir.path(), "b", &fake);
    let err = e.inject(pause(7)).unwrap_err();
    assert!(matches!(err, ApiError::AlreadyExists(_)), "{err:?}");
    assert!(e.list(true).unwrap().is_empty(), "a refusal is forgotten");
    assert_eq!(fake.calls().len(), 1, "nothing to revert: {:?}", fake.calls());
}

#[test]
fn a_driver_that_is_unavailable_refuses_with_why() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), "b", &Fake::default());
    let spec = InjectSpec {
        target: Target::Host,
        fault: Fault::Network(crate::spec::NetworkFault {
            selector: crate::spec::Selector {
                devices: vec![],
                protocol: crate::spec::Protocol::All,
                ports: vec![],
                source_ports: vec![],
                destination_ports: vec![],
                peers: vec![],
                direction: crate::spec::Direction::Both,
            },
            action: crate::spec::NetAction::Partition,
        }),
        duration: None,
        force: false,
    };
    let err = e.inject(spec).unwrap_err();
    assert!(matches!(&err, ApiError::Unavailable(m) if m == "not in this test"), "{err:?}");
    assert!(e.list(true).unwrap().is_empty());
}

/// Writes an unfinished experiment as a daemon that stopped would have
/// left it.
fn left(journal: &mut Journal, id: &str, state: State, started_ago: Duration, duration: Duration) {
    let now = SystemTime::now();
    let mut exp = Experiment::new(
        id.into(),
        Target::Pid(7),
        Fault::Process(ProcessFault::Pause),
        Some(duration),
        false,
        now - started_ago,
    );
    exp.state = state;
    journal.insert(&exp).unwrap();
    journal.add_objects(id, &[json!({"paused": 7})]).unwrap();
}

#[test]
fn reconcile_ends_reverts_adopts_and_sweeps_what_the_journal_left() {
    let dir = tempfile::tempdir().unwrap();
    let long = Duration::from_secs(3600);
    {
        let mut j = Journal::open(dir.path(), "boot-1".into()).unwrap();
        left(&mut j, "rebooted", State::Active, Duration::ZERO, long);
    }
    {
        let mut j = Journal::open(dir.path(), "boot-2".into()).unwrap();
        left(&mut j, "expired", State::Active, Duration::from_secs(120), Duration::from_secs(60));
        left(&mut j, "gone", State::Active, Duration::ZERO, long);
        left(&mut j, "adopted", State::Active, Duration::ZERO, long);
        left(&mut j, "unadoptable", State::Active, Duration::ZERO, long);
        left(&mut j, "midway", State::Injecting, Duration::ZERO, long);
    }
    let fake = Fake::default();
    {
        let mut s = fake.script();
        s.gone.insert("gone".into());
        s.no_adopt.insert("unadoptable".into());
        s.sweeps = vec!["rule 9".into()];
    }
    let e = engine(dir.path(), "boot-2", &fake);
    let out = e.reconcile().unwrap();

    assert_eq!(out.resumed, vec!["adopted".to_string()]);
    assert_eq!(out.swept, vec!["rule 9".to_string()]);
    let state = |id: &str| {
        let x = e.get(id).unwrap();
        (x.state, x.reason)
    };
    assert_eq!(state("rebooted"), (State::Expired, "ended by reboot".into()));
    assert_eq!(state("expired"), (State::Expired, "duration elapsed while the daemon was down".into()));
    assert_eq!(state("gone"), (State::Failed, "target gone: pid 7".into()));
    assert_eq!(state("midway"), (State::Failed, "daemon stopped while injecting".into()));
    let (s, why) = state("unadoptable");
    assert!(s == State::Failed && why.contains("could not resume after restart: its objects are gone"), "{why}");
    assert_eq!(state("adopted").0, State::Active);
    assert_eq!(e.list(false).unwrap().iter().map(|x| x.id.as_str()).collect::<Vec<_>>(), vec!["adopted"]);

    let calls = fake.calls();
    // An earlier boot's faults died with its kernel: nothing to revert.
    assert!(!calls.iter().any(|c| c.contains("rebooted")), "{calls:?}");
    for id in ["expired", "gone", "unadoptable", "midway"] {
        assert!(calls.contains(&format!("revert {id} 1")), "{id} reverted with its object: {calls:?}");
    }
    assert!(!calls.iter().any(|c| c.starts_with("revert adopted")), "{calls:?}");
    // The sweep runs last and knows only what is still in force.
    assert_eq!(calls.last().unwrap(), "sweep adopted", "{calls:?}");

    // A restart of the same boot finds the adopted fault again, and only it.
    drop(e);
    let fake2 = Fake::default();
    let e2 = engine(dir.path(), "boot-2", &fake2);
    let again = e2.reconcile().unwrap();
    assert_eq!(again.resumed, vec!["adopted".to_string()]);
    assert!(again.reverted.is_empty(), "{:?}", again.reverted);
}

#[test]
fn an_entry_with_a_record_that_does_not_decode_is_reported_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut j = Journal::open(dir.path(), "b".into()).unwrap();
        left(&mut j, "damaged", State::Active, Duration::ZERO, Duration::from_secs(3600));
        j.add_objects("damaged", &[json!({"from": "a newer chaosd"})]).unwrap();
    }
    let fake = Fake::default();
    let e = engine(dir.path(), "b", &fake);
    let out = e.reconcile().unwrap();
    assert_eq!(out.kept.len(), 1, "{out:?}");
    assert_eq!(out.kept[0].0, "damaged");
    assert!(out.kept[0].1.contains("journal record 1") && out.kept[0].1.contains("a newer chaosd"), "{:?}", out.kept);
    assert!(out.resumed.is_empty() && out.reverted.is_empty(), "{out:?}");
    // Neither reverted nor adopted without that record; the sweep does not
    // count it as known.
    assert_eq!(fake.calls(), vec!["sweep ".to_string()]);
    drop(e);
    // Still in the journal, every record with it, for the operator.
    let j = Journal::open(dir.path(), "b".into()).unwrap();
    let (un, _) = j.unfinished().unwrap();
    assert_eq!(un.len(), 1);
    assert_eq!((un[0].experiment.id.as_str(), un[0].experiment.state), ("damaged", State::Active));
    assert_eq!(un[0].objects, vec![json!({"paused": 7}), json!({"from": "a newer chaosd"})]);
}
