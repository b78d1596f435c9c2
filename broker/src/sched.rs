//! Scheduling hints for the threads that carry messages.
//!
//! Since Linux 6.12 a SCHED_OTHER thread may ask the EEVDF scheduler for a
//! shorter time slice through `sched_setattr(2)`'s `sched_runtime`, without
//! privilege (Documentation/scheduler/sched-eevdf.rst). A shorter
//! slice gives the thread an earlier virtual deadline, so when a message wakes it
//! it preempts a CPU-bound neighbour at once instead of waiting for that
//! neighbour's slice to run out (milliseconds). Its share of CPU (the weight,
//! from the nice value) does not change.

/// `struct sched_attr` up to `sched_period` (`SCHED_ATTR_SIZE_VER0`, 48 bytes).
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Asks the kernel for a time slice of `slice_us` microseconds for the calling
/// thread (clamped by the kernel to 100 µs..100 ms), keeping SCHED_OTHER and
/// the thread's nice value. Older kernels accept the call and ignore the
/// slice.
pub fn set_thread_slice(slice_us: u64) -> std::io::Result<()> {
    // getpriority can return -1 as a valid nice value; errno tells them apart.
    // SAFETY: __errno_location returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: no pointers; PRIO_PROCESS with 0 is the calling thread on Linux.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if nice == -1 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error().is_some_and(|c| c != 0) {
            return Err(e);
        }
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice,
        priority: 0,
        runtime: slice_us.saturating_mul(1000),
        deadline: 0,
        period: 0,
    };
    // SAFETY: `attr` is a valid, initialized sched_attr of the size it
    // declares and outlives the call; pid 0 is the calling thread.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn slice_is_accepted_without_privilege() {
        // Run on a thread of its own: the test harness thread keeps its slice.
        std::thread::spawn(|| super::set_thread_slice(100).expect("sched_setattr")).join().expect("thread");
    }
}
