use std::time::{Duration, SystemTime};

use super::*;
use crate::{
    experiment::{Counters, State},
    spec::{Fault, ProcessFault, Target},
};

fn exp(id: &str) -> Experiment {
    Experiment {
        id: id.into(),
        target: Target::Pid(42),
        fault: Fault::Process(ProcessFault::Pause),
        state: State::Injecting,
        reason: String::new(),
        created_at: SystemTime::now(),
        duration: Some(Duration::from_secs(30)),
        ends_at: None,
        ended_at: None,
        forced: false,
        counters: Counters::default(),
    }
}

#[test]
fn intent_and_objects_survive_reopen_and_end_drops_objects() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut j = Journal::open(dir.path(), "boot-a".into()).unwrap();
        j.insert(&exp("e1")).unwrap();
        j.add_object("e1", &serde_json::json!({"paused": 7})).unwrap();
        j.add_objects("e1", &[serde_json::json!({"paused": 8}), serde_json::json!({"paused": 9})]).unwrap();
    }
    let mut j = Journal::open(dir.path(), "boot-b".into()).unwrap();
    let (un, unreadable) = j.unfinished().unwrap();
    assert!(unreadable.is_empty());
    assert_eq!(un.len(), 1);
    assert_eq!(un[0].boot_id, "boot-a");
    let paused = |n: u32| serde_json::json!({ "paused": n });
    assert_eq!(un[0].objects, vec![paused(7), paused(8), paused(9)], "objects come back in recording order");
    let mut e = un[0].experiment.clone();
    e.state = State::Recovered;
    j.update(&e).unwrap();
    assert!(j.unfinished().unwrap().0.is_empty());
    assert!(j.objects("e1").unwrap().is_empty());
    assert_eq!(j.list(true).unwrap().len(), 1);
    assert!(j.list(false).unwrap().is_empty());
}

#[test]
fn a_second_daemon_cannot_open_the_same_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Journal::open(dir.path(), "b".into()).unwrap();
    let err = Journal::open(dir.path(), "b".into()).err().expect("second open must fail");
    assert!(err.to_string().contains("another chaosd"), "{err}");
}

/// The tables exactly as chaosd wrote them before schema versions
/// (user_version 0), with an experiment that was active when it stopped.
fn write_schema_1(dir: &Path, exp: &Experiment) {
    let conn = Connection::open(dir.join("journal.sqlite3")).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE IF NOT EXISTS experiments (
             id TEXT PRIMARY KEY,
             boot_id TEXT NOT NULL,
             state TEXT NOT NULL,
             created_ns INTEGER NOT NULL,
             body TEXT NOT NULL
         );
         CREATE TABLE IF NOT EXISTS objects (
             experiment_id TEXT NOT NULL,
             seq INTEGER NOT NULL,
             body TEXT NOT NULL,
             PRIMARY KEY (experiment_id, seq)
         );",
    )
    .unwrap();
    conn.execute(
        "INSERT INTO experiments (id, boot_id, state, created_ns, body) VALUES (?1, 'boot-a', 'active', 1, ?2)",
        params![exp.id, serde_json::to_string(exp).unwrap()],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO objects (experiment_id, seq, body) VALUES (?1, 1, '{\"kind\":\"paused\",\"pid\":7,\"start_time\":9}')",
        params![exp.id],
    )
    .unwrap();
    let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(v, 0, "the old chaosd left no schema version");
}

#[test]
fn a_journal_of_the_previous_schema_opens_with_its_entries_and_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let mut old = exp("e1");
    old.state = State::Active;
    write_schema_1(dir.path(), &old);
    let j = Journal::open(dir.path(), "boot-a".into()).unwrap();
    let (un, unreadable) = j.unfinished().unwrap();
    assert!(unreadable.is_empty());
    assert_eq!(un.len(), 1);
    assert_eq!(un[0].experiment, old);
    assert_eq!(un[0].objects, vec![serde_json::json!({"kind": "paused", "pid": 7, "start_time": 9})]);
    let version: i64 = j.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let index: i64 = j
        .conn
        .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'experiments_by_state'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(index, 1, "migration 2 ran");
    drop(j);
    // Opening again runs nothing twice.
    Journal::open(dir.path(), "boot-a".into()).unwrap();
}

#[test]
fn a_journal_of_a_newer_schema_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    drop(Journal::open(dir.path(), "b".into()).unwrap());
    {
        let conn = Connection::open(dir.path().join("journal.sqlite3")).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
    }
    let err = Journal::open(dir.path(), "b".into()).err().expect("a newer schema must be refused");
    let msg = err.to_string();
    assert!(msg.contains("newer chaosd") && msg.contains("--state-dir"), "{msg}");
    let conn = Connection::open(dir.path().join("journal.sqlite3")).unwrap();
    let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(v, SCHEMA_VERSION + 1, "not touched");
}

#[test]
fn an_entry_that_does_not_decode_is_reported_apart_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(dir.path(), "b".into()).unwrap();
        j.insert(&exp("good")).unwrap();
        j.conn
            .execute(
                "INSERT INTO experiments (id, boot_id, state, created_ns, body) VALUES ('bad', 'b', 'active', 2, '{')",
                [],
            )
            .unwrap();
    }
    let j = Journal::open(dir.path(), "b".into()).unwrap();
    let (un, unreadable) = j.unfinished().unwrap();
    assert_eq!(un.iter().map(|u| u.experiment.id.as_str()).collect::<Vec<_>>(), vec!["good"]);
    assert_eq!(unreadable.len(), 1);
    assert!(unreadable[0].to_string().contains("undecodable entry bad"), "{}", unreadable[0]);
    let kept: i64 = j.conn.query_row("SELECT count(*) FROM experiments WHERE id = 'bad'", [], |r| r.get(0)).unwrap();
    assert_eq!(kept, 1);
}
