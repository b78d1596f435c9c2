//! Process faults: kill (a signal) and pause (SIGSTOP for the duration, then
//! SIGCONT), with a guardian process that resumes paused processes even when
//! the daemon dies. See ../stress/architecture.md.

pub mod clients;
mod driver;
pub mod guardian;
pub mod procfs;
pub mod signal;
pub mod targets;

pub use driver::{DEFAULT_GRACE, ProcessDriver};
