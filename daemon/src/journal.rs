//! The journal: SQLite under the state directory. An experiment is written
//! before the kernel is touched, every object a driver creates is recorded
//! before it is created, and the boot id is stamped so that entries from an
//! earlier boot can be closed as ended by reboot.

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use crate::experiment::Experiment;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Sql {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "journal {path}: another chaosd uses this state directory (lock {lock} is held); stop it or pass --state-dir"
    )]
    Locked { path: PathBuf, lock: PathBuf },
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "journal {path} was written by a newer chaosd (schema {found}; this one knows schemas up to {known}): \
         run that chaosd to recover its faults, or give this one another --state-dir"
    )]
    Newer { path: PathBuf, found: i64, known: i64 },
    #[error("journal {path}: undecodable entry {id}: {source}")]
    Decode {
        path: PathBuf,
        id: String,
        #[source]
        source: serde_json::Error,
    },
}

pub struct Journal {
    conn: Connection,
    path: PathBuf,
    boot_id: String,
    /// Endings written since ended experiments were last pruned.
    ended_since_prune: u32,
    _lock: Flock<File>,
}

/// An experiment that had not ended when the journal was last written.
pub struct Unfinished {
    pub experiment: Experiment,
    pub boot_id: String,
    pub objects: Vec<Value>,
}

/// Terminal experiments kept for `list --all` and `get` (pruned every
/// `PRUNE_EVERY` endings, so up to `KEEP_ENDED + PRUNE_EVERY` are kept):
/// pruning sorts every ended entry, too slow to do on each recover.
const KEEP_ENDED: i64 = 1000;
const PRUNE_EVERY: u32 = 64;

/// The journal's schema, one migration a version: `PRAGMA user_version`
/// says how many have run. A journal of an older chaosd is brought up to
/// date at open, in one transaction per step; one of a newer chaosd is
/// refused, never guessed at. Never edit a migration that has shipped: add
/// one.
const MIGRATIONS: &[&str] = &[
    // 1: experiments and the objects each recorded (chaosd before schema
    // versions wrote exactly these tables and left user_version at 0, so
    // IF NOT EXISTS makes this step a no-op on its journals).
    "CREATE TABLE IF NOT EXISTS experiments (
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
    // 2: start-up and pruning select by state, newest first; without an
    // index both read every ended experiment kept.
    "CREATE INDEX IF NOT EXISTS experiments_by_state ON experiments (state, created_ns);",
];

/// The schema this chaosd writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), JournalError> {
    let sql = |source| JournalError::Sql { path: path.to_path_buf(), source };
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql)?;
    if found > SCHEMA_VERSION {
        return Err(JournalError::Newer { path: path.to_path_buf(), found, known: SCHEMA_VERSION });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        let tx = conn.transaction().map_err(sql)?;
        tx.execute_batch(step).map_err(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1).map_err(sql)?;
        tx.commit().map_err(sql)?;
    }
    Ok(())
}

/// The kernel's id of the current boot.
pub fn current_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl Journal {
    /// Opens (or creates) `dir/journal.sqlite3`, locking the directory
    /// against a second daemon.
    pub fn open(dir: &Path, boot_id: String) -> Result<Self, JournalError> {
        let path = dir.join("journal.sqlite3");
        let lock_path = dir.join(crate::owner::LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| JournalError::Io { path: lock_path.clone(), source })?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| JournalError::Locked { path: path.clone(), lock: lock_path.clone() })?;
        let sql = |source| JournalError::Sql { path: path.clone(), source };
        let mut conn = Connection::open(&path).map_err(sql)?;
        // WAL with synchronous=NORMAL: a commit is in the OS before the
        // kernel is touched, so it survives a crash of the daemon (what the
        // journal is for); only a power loss can drop the last commits, and a
        // power loss reboots the kernel, which discards every fault anyway
        // (entries of an earlier boot are closed by the boot id). No fsync per
        // commit keeps an injection well under a millisecond. Exclusive
        // locking: only this daemon opens the file (the lock above), so a
        // commit takes no file locks and needs no shared-memory index.
        conn.execute_batch(
            "PRAGMA locking_mode = EXCLUSIVE;
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;",
        )
        .map_err(sql)?;
        migrate(&mut conn, &path)?;
        Ok(Self { conn, path, boot_id, ended_since_prune: PRUNE_EVERY, _lock: lock })
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> JournalError + '_ {
        |source| JournalError::Sql { path: self.path.clone(), source }
    }

    fn encode(exp: &Experiment) -> String {
        serde_json::to_string(exp).expect("experiments serialize")
    }

    fn decode(&self, id: &str, body: &str) -> Result<Experiment, JournalError> {
        serde_json::from_str(body).map_err(|source| JournalError::Decode {
            path: self.path.clone(),
            id: id.into(),
            source,
        })
    }

    /// Writes a new experiment (the intent).
    pub fn insert(&self, exp: &Experiment) -> Result<(), JournalError> {
        let created = exp.created_at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as i64;
        self.conn
            .prepare_cached(
                "INSERT INTO experiments (id, boot_id, state, created_ns, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut st| st.execute(params![exp.id, self.boot_id, exp.state.name(), created, Self::encode(exp)]))
            .map_err(self.sql())?;
        Ok(())
    }

    /// Removes an experiment that never was one: a request refused before
    /// anything was applied (its objects, if any, were rolled back).
    pub fn forget(&mut self, id: &str) -> Result<(), JournalError> {
        let path = self.path.clone();
        let sql = |source| JournalError::Sql { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(sql)?;
        tx.execute("DELETE FROM objects WHERE experiment_id = ?1", params![id]).map_err(sql)?;
        tx.execute("DELETE FROM experiments WHERE id = ?1", params![id]).map_err(sql)?;
        tx.commit().map_err(sql)
    }

    /// Rewrites an experiment (state, reason, counters). When it ended, its
    /// objects are dropped: they no longer exist in the kernel.
    pub fn update(&mut self, exp: &Experiment) -> Result<(), JournalError> {
        let path = self.path.clone();
        let sql = |source| JournalError::Sql { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(sql)?;
        tx.prepare_cached("UPDATE experiments SET state = ?2, body = ?3 WHERE id = ?1")
            .and_then(|mut st| st.execute(params![exp.id, exp.state.name(), Self::encode(exp)]))
            .map_err(sql)?;
        if exp.state.is_terminal() {
            tx.prepare_cached("DELETE FROM objects WHERE experiment_id = ?1")
                .and_then(|mut st| st.execute(params![exp.id]))
                .map_err(sql)?;
            self.ended_since_prune += 1;
        }
        if self.ended_since_prune >= PRUNE_EVERY {
            tx.execute(
                "DELETE FROM experiments WHERE state IN ('recovered','failed','expired') AND id NOT IN
                   (SELECT id FROM experiments WHERE state IN ('recovered','failed','expired')
                    ORDER BY created_ns DESC LIMIT ?1)",
                params![KEEP_ENDED],
            )
            .map_err(sql)?;
        }
        tx.commit().map_err(sql)?;
        if self.ended_since_prune >= PRUNE_EVERY {
            self.ended_since_prune = 0;
        }
        Ok(())
    }

    /// Records one kernel object of an experiment, before it is created.
    pub fn add_object(&mut self, id: &str, object: &Value) -> Result<(), JournalError> {
        self.add_objects(id, std::slice::from_ref(object))
    }

    /// Records several objects in one commit, before any of them is created.
    pub fn add_objects(&mut self, id: &str, objects: &[Value]) -> Result<(), JournalError> {
        let path = self.path.clone();
        let sql = |source| JournalError::Sql { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(sql)?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO objects (experiment_id, seq, body)
                     VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM objects WHERE experiment_id = ?1), ?2)",
                )
                .map_err(sql)?;
            for object in objects {
                st.execute(params![id, object.to_string()]).map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)
    }

    pub fn objects(&self, id: &str) -> Result<Vec<Value>, JournalError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT body FROM objects WHERE experiment_id = ?1 ORDER BY seq")
            .map_err(self.sql())?;
        let rows = stmt.query_map(params![id], |r| r.get::<_, String>(0)).map_err(self.sql())?;
        let mut out = Vec::new();
        for row in rows {
            let body = row.map_err(self.sql())?;
            out.push(serde_json::from_str(&body).unwrap_or(Value::String(body)));
        }
        Ok(out)
    }

    pub fn get(&self, id: &str) -> Result<Option<Experiment>, JournalError> {
        let body: Option<String> = self
            .conn
            .query_row("SELECT body FROM experiments WHERE id = ?1", params![id], |r| r.get(0))
            .optional()
            .map_err(self.sql())?;
        body.map(|b| self.decode(id, &b)).transpose()
    }

    /// Experiments newest first; only unfinished ones unless `include_ended`.
    pub fn list(&self, include_ended: bool) -> Result<Vec<Experiment>, JournalError> {
        let query = if include_ended {
            "SELECT id, body FROM experiments ORDER BY created_ns DESC"
        } else {
            "SELECT id, body FROM experiments WHERE state NOT IN ('recovered','failed','expired') ORDER BY created_ns DESC"
        };
        let mut stmt = self.conn.prepare(query).map_err(self.sql())?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).map_err(self.sql())?;
        let mut out = Vec::new();
        for row in rows {
            let (id, body) = row.map_err(self.sql())?;
            out.push(self.decode(&id, &body)?);
        }
        Ok(out)
    }

    /// Every experiment that had not ended, with its boot id and objects;
    /// apart, the entries that do not decode (left as they are, for the
    /// operator: the caller reports them).
    pub fn unfinished(&self) -> Result<(Vec<Unfinished>, Vec<JournalError>), JournalError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, boot_id, body FROM experiments
                 WHERE state NOT IN ('recovered','failed','expired') ORDER BY created_ns",
            )
            .map_err(self.sql())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))
            .map_err(self.sql())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql())?;
        drop(stmt);
        let mut out = Vec::new();
        let mut unreadable = Vec::new();
        for (id, boot_id, body) in rows {
            match self.decode(&id, &body) {
                Ok(experiment) => {
                    let objects = self.objects(&id)?;
                    out.push(Unfinished { experiment, boot_id, objects });
                }
                Err(e) => unreadable.push(e),
            }
        }
        Ok((out, unreadable))
    }

    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }
}

#[cfg(test)]
mod tests;
