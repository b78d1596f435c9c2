//! Process faults: kill (a signal) and pause (SIGSTOP for the duration, then
//! SIGCONT), with a guardian process that resumes paused processes even when
//! the daemon dies. See ../stress/architecture.md.

pub(crate) mod clients;
mod driver;
pub mod guardian;
pub mod procfs;
pub(crate) mod signal;
pub(crate) mod targets;

pub use driver::{DEFAULT_GRACE, ProcessDriver};
