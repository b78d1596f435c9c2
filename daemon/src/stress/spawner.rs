//! Starting stressors from one long-lived thread. PR_SET_PDEATHSIG fires
//! when the *thread* that forked the child exits, not the process: a
//! stressor forked from a `spawn_blocking` thread would be killed as soon
//! as tokio retired that idle thread. So every fork happens on this
//! thread, which lives as long as the driver.

use std::{
    io,
    os::unix::process::CommandExt,
    process::{Child, Command},
    sync::{Mutex, mpsc},
    thread,
};

type Job = Box<dyn FnOnce() + Send>;

pub struct Spawner {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl Spawner {
    pub fn new() -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new().name("chaosd-spawner".into()).spawn(move || {
            // Ends when the driver (the sender) is dropped; the stressors
            // then get their SIGKILL, which is what dropping means.
            for job in rx {
                job();
            }
        })?;
        Ok(Self { jobs: Mutex::new(tx) })
    }

    /// Spawns `cmd` on the spawner thread with PR_SET_PDEATHSIG(SIGKILL)
    /// armed before exec, and without privileges after exec.
    ///
    /// SECBIT_NOROOT: exec as root would otherwise hand the stressor every
    /// capability, more than the daemon kept. The kernel then (a) refuses
    /// to move it into a v2 cgroup with the cpuset controller
    /// (cpuset_can_attach -> security_task_setscheduler -> cap_safe_nice:
    /// EPERM unless the mover holds CAP_SYS_NICE or a superset of its
    /// capabilities) and (b) clears PR_SET_PDEATHSIG at exec (commit_creds
    /// on raised capabilities). A stressor needs no privilege at all.
    pub fn spawn(&self, mut cmd: Command) -> io::Result<Child> {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe calls (prctl, getppid, _exit).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // Needs CAP_SETPCAP; without it the stressor keeps root's
                // capabilities and re-arms PDEATHSIG itself after exec.
                libc::prctl(libc::PR_SET_SECUREBITS, libc::SECBIT_NOROOT as libc::c_ulong);
                // The daemon died between fork and prctl: nobody will ever
                // release or kill this stressor.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(cmd.spawn());
        });
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| io::Error::other("the spawner thread is gone"))?;
        rx.recv().map_err(|_| io::Error::other("the spawner thread is gone"))?
    }
}
