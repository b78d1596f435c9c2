//! Entering network namespaces. The work always happens on a dedicated OS
//! thread that calls setns(2) (or unshare(2) for a scratch namespace), does
//! its work and exits: a thread in a foreign namespace is never reused, so no
//! tokio worker or pooled thread can be left in the wrong namespace.
//! Netlink sockets opened on that thread stay bound to the namespace.

use std::{
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
    thread,
};

use nix::sched::{CloneFlags, setns, unshare};

/// A network namespace, named by a file that refers to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsRef {
    path: PathBuf,
    label: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {label} not found ({path}): {source}")]
    Open {
        label: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("setns into network namespace {label}: {source}")]
    Setns {
        label: String,
        #[source]
        source: nix::Error,
    },
    #[error("unshare(CLONE_NEWNET) for a scratch namespace: {0}")]
    Unshare(#[source] nix::Error),
    #[error("spawning a thread for network namespace {label}: {source}")]
    Spawn {
        label: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the worker thread in network namespace {0} panicked")]
    Panicked(String),
}

impl NetnsRef {
    /// A namespace created by `ip netns add NAME` (bind-mounted under /run/netns).
    pub fn named(name: &str) -> Self {
        Self { path: Path::new("/run/netns").join(name), label: format!("'{name}'") }
    }

    /// The namespace of a process.
    pub fn of_pid(pid: u32) -> Self {
        Self { path: PathBuf::from(format!("/proc/{pid}/ns/net")), label: format!("of pid {pid}") }
    }

    /// Any namespace file (bind mount or /proc/PID/ns/net).
    pub fn path(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self { label: path.display().to_string(), path }
    }

    /// The daemon's own namespace.
    pub fn host() -> Self {
        Self { path: PathBuf::from("/proc/self/ns/net"), label: "host".into() }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn file_path(&self) -> &Path {
        &self.path
    }

    /// Opens the namespace file now, so a missing namespace fails here rather
    /// than on the worker thread.
    pub fn open(&self) -> Result<File, NetnsError> {
        File::open(&self.path).map_err(|source| NetnsError::Open {
            label: self.label.clone(),
            path: self.path.clone(),
            source,
        })
    }

    /// Inode of the namespace: equal inodes are the same namespace.
    pub fn inode(&self) -> Result<u64, NetnsError> {
        use std::os::unix::fs::MetadataExt;
        let file = self.open()?;
        file.metadata().map(|m| m.ino()).map_err(|source| NetnsError::Open {
            label: self.label.clone(),
            path: self.path.clone(),
            source,
        })
    }

    /// Runs `f` on a new thread inside this namespace and returns its
    /// result. The thread is scoped: `f` may borrow from the caller, so a
    /// whole operation can run on one thread (one setns, two hand-offs).
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let file = self.open()?;
        let label = self.label.clone();
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name("chaosd-netns".into())
                .spawn_scoped(scope, || -> Result<T, NetnsError> {
                    setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                        .map_err(|source| NetnsError::Setns { label: label.clone(), source })?;
                    Ok(f())
                })
                .map_err(|source| NetnsError::Spawn { label: label.clone(), source })?;
            handle.join().map_err(|_| NetnsError::Panicked(label.clone()))?
        })
    }
}

/// Runs `f` on a new thread inside a fresh, empty network namespace that
/// disappears when the thread exits (whatever `f` did or left there).
pub fn run_in_scratch_netns<T, F>(f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let handle = thread::Builder::new()
        .name("chaosd-scratch".into())
        .spawn(move || -> Result<T, NetnsError> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(NetnsError::Unshare)?;
            Ok(f())
        })
        .map_err(|source| NetnsError::Spawn { label: "scratch".into(), source })?;
    handle.join().map_err(|_| NetnsError::Panicked("scratch".into()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_named_namespace_is_a_clear_error() {
        let err = NetnsRef::named("chaosd-test-does-not-exist").run(|| ()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("'chaosd-test-does-not-exist' not found"), "{msg}");
    }

    #[test]
    fn work_runs_on_its_own_thread_and_may_borrow_from_the_caller() {
        assert!(nix::unistd::geteuid().is_root(), "setns needs root: run the tests as root (scripts/test.sh)");
        let mut seen = Vec::new();
        let caller = std::thread::current().id();
        let ran_on = NetnsRef::host()
            .run(|| {
                seen.push(1);
                std::thread::current().id()
            })
            .unwrap();
        assert_ne!(ran_on, caller);
        assert_eq!(seen, [1]);
        let err = NetnsRef::host().run(|| panic!("job fails")).map(|_: ()| ()).unwrap_err();
        assert!(matches!(err, NetnsError::Panicked(_)), "{err}");
    }
}
