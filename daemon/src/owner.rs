//! Which daemon a kernel object belongs to.
//!
//! Several chaosd daemons can run on one host (each with its own socket,
//! state directory and BPF directory), and all of them sweep the host's
//! namespaces at start for objects a dead daemon left behind. So every
//! labelled object chaosd creates in a namespace carries its owner: the
//! canonical path of the owner's state directory, in the IFB device's alias
//! and in the name of its cls_bpf filters (`chaosd_tc@/var/lib/chaosd`). An
//! owner is alive exactly while it holds the lock on its journal
//! (`STATE_DIR/journal.lock`); the check reads /proc/locks instead of trying
//! the lock, so it can never make a restarting owner find its own lock taken.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// The lock file a live owner holds, relative to its state directory.
pub const LOCK_FILE: &str = "journal.lock";

/// Labels must fit an interface alias (IFALIASZ = 256, with its NUL).
const MAX_LABEL: usize = 255;

/// The identity of a daemon: its canonical state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner(String);

#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("state directory {0}: {1}")]
    Canonicalize(PathBuf, #[source] std::io::Error),
    #[error(
        "state directory {0} is {1} bytes long; chaosd writes it into kernel object names of at most {max} bytes: \
         pass a shorter --state-dir",
        max = MAX_LABEL - "chaosd_tc_ingress@".len()
    )]
    TooLong(String, usize),
    #[error("state directory {0} is not valid UTF-8: pass a --state-dir with a UTF-8 path")]
    NotUtf8(PathBuf),
}

impl Owner {
    /// The owner identity of the daemon whose state directory is `dir`
    /// (which must exist).
    pub fn of_state_dir(dir: &Path) -> Result<Self, OwnerError> {
        let canonical = dir.canonicalize().map_err(|e| OwnerError::Canonicalize(dir.to_path_buf(), e))?;
        let s = canonical.to_str().ok_or_else(|| OwnerError::NotUtf8(canonical.clone()))?.to_string();
        // The longest label chaosd writes.
        if "chaosd_tc_ingress@".len() + s.len() > MAX_LABEL {
            return Err(OwnerError::TooLong(s.clone(), s.len()));
        }
        Ok(Self(s))
    }

    /// An identity without checks (tests, and the default configuration).
    pub fn new(path: impl Into<String>) -> Self {
        Self(path.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `what@owner`, the name or alias of an object this daemon creates.
    pub fn label(&self, what: &str) -> String {
        format!("{what}@{}", self.0)
    }

    /// Whose an object with this label is, as seen from this daemon.
    pub fn whose(&self, label: &str) -> Whose {
        match parse(label) {
            None => Whose::Unlabelled,
            Some((_, owner)) if owner == self.0 => Whose::Mine,
            Some((_, owner)) if alive(owner) => Whose::Live(owner.to_string()),
            Some((_, owner)) => Whose::Dead(owner.to_string()),
        }
    }
}

/// The owner of a labelled object, from one daemon's point of view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Whose {
    Mine,
    /// Another daemon that is running (its lock is held).
    Live(String),
    /// A daemon that is gone (its lock is free or its directory is gone).
    Dead(String),
    /// chaosd's name without an owner: left by a chaosd older than labels.
    Unlabelled,
}

impl Whose {
    /// Whether a sweep may remove an object no journal entry of ours owns.
    pub fn sweepable(&self) -> bool {
        matches!(self, Whose::Dead(_) | Whose::Unlabelled)
    }
}

/// Splits `what@owner`.
pub fn parse(label: &str) -> Option<(&str, &str)> {
    let (what, owner) = label.split_once('@')?;
    owner.starts_with('/').then_some((what, owner))
}

/// Whether the daemon whose state directory is `owner` is running: some
/// process holds a flock on its lock file.
pub fn alive(owner: &str) -> bool {
    let Ok(meta) = std::fs::metadata(Path::new(owner).join(LOCK_FILE)) else { return false };
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        // Without /proc/locks nothing proves the owner dead: keep its objects.
        return true;
    };
    let dev = meta.dev();
    let want = (libc::major(dev), libc::minor(dev), meta.ino());
    locks.lines().any(|l| flock_on(l) == Some(want))
}

/// The (major, minor, inode) of a FLOCK line of /proc/locks:
/// `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF`.
fn flock_on(line: &str) -> Option<(u32, u32, u64)> {
    let mut f = line.split_whitespace();
    let _ordinal = f.next()?;
    if f.next()? != "FLOCK" {
        return None;
    }
    let file = f.nth(3)?;
    let mut parts = file.split(':');
    let major = u32::from_str_radix(parts.next()?, 16).ok()?;
    let minor = u32::from_str_radix(parts.next()?, 16).ok()?;
    let ino = parts.next()?.parse().ok()?;
    Some((major, minor, ino))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use nix::fcntl::{Flock, FlockArg};

    use super::*;

    #[test]
    fn labels_round_trip_and_foreign_names_are_not_labels() {
        let me = Owner::new("/var/lib/chaosd");
        assert_eq!(me.label("chaosd_tc"), "chaosd_tc@/var/lib/chaosd");
        assert_eq!(parse("chaosd_tc@/var/lib/chaosd"), Some(("chaosd_tc", "/var/lib/chaosd")));
        assert_eq!(parse("chaosd_tc"), None);
        assert_eq!(parse("user@example.com"), None);
        assert_eq!(me.whose("chaosd_tc@/var/lib/chaosd"), Whose::Mine);
        assert_eq!(me.whose("chaosd_tc"), Whose::Unlabelled);
    }

    #[test]
    fn proc_locks_lines_parse() {
        assert_eq!(flock_on("1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"), Some((0xfd, 1, 5678)));
        assert_eq!(flock_on("2: POSIX  ADVISORY  WRITE 99 00:1a:42 0 EOF"), None);
        assert_eq!(flock_on("3: FLOCK  ADVISORY  READ 7 103:02:9 0 EOF"), Some((0x103, 2, 9)));
    }

    #[test]
    fn an_owner_is_alive_while_its_lock_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let owner = Owner::of_state_dir(dir.path()).unwrap();
        let other = Owner::new("/nonexistent/state");
        let label = owner.label("chaosd_owner");
        assert_eq!(other.whose(&label), Whose::Dead(owner.as_str().into()), "no lock file: dead");
        let file = std::fs::File::create(dir.path().join(LOCK_FILE)).unwrap();
        assert!(file.metadata().unwrap().ino() > 0);
        assert_eq!(other.whose(&label), Whose::Dead(owner.as_str().into()), "lock file, no lock: dead");
        let held = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e).unwrap();
        assert_eq!(other.whose(&label), Whose::Live(owner.as_str().into()));
        drop(held);
        assert_eq!(other.whose(&label), Whose::Dead(owner.as_str().into()), "released: dead again");
    }

    #[test]
    fn a_state_dir_too_long_for_a_label_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().to_path_buf();
        while deep.as_os_str().len() < 260 {
            deep.push("abcdefghijklmnopqrstuvwxyz");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let e = Owner::of_state_dir(&deep).unwrap_err().to_string();
        assert!(e.contains("shorter --state-dir"), "{e}");
    }
}
