//! The handover's pause at real-time priority.
//!
//! Between the source's stop and the destination's resume the device moves
//! no packet, and almost all of that time is waiting to be scheduled: on a
//! busy host a woken thread at normal priority can wait a whole time slice
//! (several milliseconds) behind the guests' vCPU threads, against about
//! 100 µs of actual work. So each side's control thread runs the pause as
//! SCHED_FIFO at the lowest real-time priority, and only the pause: the
//! destination from `Prepared` (it then sleeps until the commit wakes it at
//! once) to its resume, the source (with its datapath threads, which its
//! stop waits for) from its stop to `Ready`. Both windows are bounded by the
//! handover's timeouts and spent mostly asleep.
//!
//! An unprivileged sandnic (`--user`) may do this because root raised
//! RLIMIT_RTPRIO to 1 before the drop (`allow_after_drop`). Where the
//! policy cannot be set (a container without it, another limit), the pause
//! runs at normal priority: slower on a busy host, never wrong.

use tracing::debug;

/// The priority used: the lowest real-time one, above every normal thread
/// and below any real-time thread the host runs.
const PAUSE_PRIORITY: libc::c_int = 1;

/// Lets this process use `PauseAtRealTime` after it gives up root: an
/// unprivileged process may choose SCHED_FIFO up to its RLIMIT_RTPRIO.
/// Call while still root; a limit already high enough is left alone.
pub fn allow_after_drop() {
    let wanted = PAUSE_PRIORITY as libc::rlim_t;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `struct rlimit` to the pointer given,
    // which points to one.
    if unsafe { libc::getrlimit(libc::RLIMIT_RTPRIO, &mut limit) } != 0 || limit.rlim_cur >= wanted
    {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: limit.rlim_max.max(wanted),
    };
    // SAFETY: setrlimit reads one `struct rlimit` from the pointer given.
    if unsafe { libc::setrlimit(libc::RLIMIT_RTPRIO, &raised) } != 0 {
        debug!("RLIMIT_RTPRIO stays at {}", limit.rlim_cur);
    }
}

/// Threads at SCHED_FIFO until dropped, then back to the policy each had.
pub struct PauseAtRealTime {
    raised: Vec<(libc::pid_t, libc::c_int, libc::sched_param)>,
}

impl PauseAtRealTime {
    /// The calling thread.
    pub fn raise() -> Self {
        Self::raise_with(&[])
    }

    /// The calling thread and `threads` (ids of this process's threads). The
    /// source's datapath threads are among them: its stop waits for each to
    /// finish its batch, and one preempted mid-batch would hold the pause up
    /// (the control thread's priority does not pass to a lock's holder).
    pub fn raise_with(threads: &[libc::pid_t]) -> Self {
        let raised = std::iter::once(0)
            .chain(threads.iter().copied().filter(|&tid| tid > 0))
            .filter_map(raise_thread)
            .collect();
        Self { raised }
    }
}

/// Puts thread `tid` (0: the caller) at SCHED_FIFO; its previous policy.
fn raise_thread(tid: libc::pid_t) -> Option<(libc::pid_t, libc::c_int, libc::sched_param)> {
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_getscheduler takes a thread id and reads no memory.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    // SAFETY: sched_getparam writes one `struct sched_param` to the pointer
    // given, which points to one.
    if policy < 0 || unsafe { libc::sched_getparam(tid, &mut param) } != 0 {
        return None;
    }
    let fifo = libc::sched_param {
        sched_priority: PAUSE_PRIORITY,
    };
    // Threads created meanwhile start at normal priority.
    let policy_fifo = libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK;
    // SAFETY: sched_setscheduler reads one `struct sched_param` from the
    // pointer given, which points to one.
    if unsafe { libc::sched_setscheduler(tid, policy_fifo, &fifo) } != 0 {
        debug!(
            tid,
            "the handover pause runs at normal priority: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    Some((tid, policy, param))
}

impl Drop for PauseAtRealTime {
    fn drop(&mut self) {
        for (tid, policy, param) in self.raised.drain(..) {
            // SAFETY: as in `raise_thread`: one `struct sched_param`, read
            // only. A thread that ended meanwhile answers ESRCH, ignored.
            unsafe { libc::sched_setscheduler(tid, policy, &param) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn policy(tid: libc::pid_t) -> libc::c_int {
        // SAFETY: sched_getscheduler reads no memory.
        let policy = unsafe { libc::sched_getscheduler(tid) };
        policy & !libc::SCHED_RESET_ON_FORK
    }

    #[test]
    fn the_pause_runs_at_fifo_and_the_threads_return_to_their_policy() {
        // SAFETY: geteuid reads no memory.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("*** SKIPPED: not root, SCHED_FIFO may be denied ***");
            return;
        }
        // A second thread, as a datapath thread is to the control thread.
        let (tid_tx, tid_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
            let _ = done_rx.recv();
        });
        let other_tid = tid_rx.recv().unwrap();
        // The policy is per thread: raise from a thread of its own.
        std::thread::spawn(move || {
            let before = (policy(0), policy(other_tid));
            let raised = PauseAtRealTime::raise_with(&[other_tid]);
            assert_eq!(
                (policy(0), policy(other_tid)),
                (libc::SCHED_FIFO, libc::SCHED_FIFO)
            );
            drop(raised);
            assert_eq!((policy(0), policy(other_tid)), before);
        })
        .join()
        .unwrap();
        done_tx.send(()).unwrap();
        other.join().unwrap();
    }
}
