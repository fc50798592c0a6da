//! The per-queue-pair thread: waits on the TX and RX kick fds, the TAP queue
//! and a wake fd, and moves packets in batches.
//!
//! All state the thread works on sits in `PairState` behind one mutex that
//! is held for one batch at a time. The control thread takes the same mutex
//! to reconfigure the pair, so every change (new memory, a stopped ring, a
//! pause for handover) lands exactly at a batch boundary.

use super::notify;
use super::rx::{process_rx, RxContext, RxOutcome};
use super::stats::Batch;
use super::tx::{process_tx, TxContext};
use super::{PairShared, PairState};
use crate::hardening::allowlists::Role;
use crate::tap::Tap;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::{error, warn};

/// Chains or frames per batch: bounds how long the lock is held and keeps
/// notifications coalesced.
pub const BATCH: usize = 256;
/// How long to sleep, in ms, when the TAP cannot be put in the epoll set.
const RETRY_NAP_MS: u8 = 1;

const WAKE: u64 = 0;
const TX_KICK: u64 = 1;
const RX_KICK: u64 = 2;
const TAP: u64 = 3;

/// The fds the thread currently polls; rebuilt when the control thread
/// changes the pair (its generation moves).
struct Registration {
    epoll: Epoll,
    generation: u64,
    /// Kick fds with their tokens (held open while registered).
    kicks: Vec<(u64, Arc<OwnedFd>)>,
    tap_watched: bool,
    /// The last `epoll_ctl` on the TAP failed (logged once, not per retry).
    tap_ctl_failed: bool,
}

/// What one pass over the pair's rings found.
#[derive(Debug, Clone, Copy, Default)]
struct Pass {
    /// A budget ran out: more may be waiting right now.
    more: bool,
    /// RX could take frames (buffers given, link up): the TAP is worth
    /// waiting for.
    want_tap: bool,
    /// Anything moved.
    worked: bool,
    /// The TAP failed in a way that may persist: nap instead of sleeping
    /// on it (it may stay readable) or polling it (that would spin).
    tap_failing: bool,
}

pub fn run(shared: Arc<PairShared>, tap: Arc<Tap>) {
    shared
        .tid
        .store(nix::unistd::gettid().as_raw(), Ordering::Release);
    let Some(tap_fd) = tap.queue(usize::from(shared.index)) else {
        error!(pair = shared.index, "no TAP queue for this pair");
        return;
    };
    let mut iov = Vec::with_capacity(64);
    let mut reg: Option<Registration> = None;
    let mut events = [EpollEvent::empty(); 8];
    let mut last = Pass::default();
    let mut last_work = std::time::Instant::now();
    while !shared.stop.load(Ordering::Acquire) {
        confine_if_asked(&shared);
        let generation = shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .generation;
        if reg.as_ref().map(|r| r.generation) != Some(generation) {
            match register(&shared, generation) {
                Ok(r) => {
                    reg = Some(r);
                    // The wake that announced this change may already be
                    // consumed: look at the rings once before sleeping.
                    last.more = true;
                }
                Err(e) => {
                    error!(pair = shared.index, "epoll setup failed: {e}");
                    return;
                }
            }
        }
        let r = reg.as_mut().expect("registered above");
        let busy = last.more || last_work.elapsed() < shared.busy_poll;
        let sleeping = last.tap_failing || !busy;
        let watch = last.want_tap && sleeping && !last.tap_failing;
        let watching = r.watch_tap(tap_fd, watch, shared.index) && !last.tap_failing;
        let n = match r.epoll.wait(&mut events, wait_timeout(sleeping, watching)) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                error!(pair = shared.index, "epoll_wait: {e}");
                return;
            }
        };
        r.drain_fired(&events[..n], &shared);
        let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.generation != r.generation {
            continue;
        }
        last = one_batch(&shared, &mut st, tap_fd, &mut iov);
        drop(st);
        if last.worked {
            last_work = std::time::Instant::now();
        }
    }
}

/// Puts the seccomp filter the control thread handed over on this thread
/// (once; checked once per pass, under an uncontended lock).
fn confine_if_asked(shared: &PairShared) {
    if shared.confined.load(Ordering::Relaxed) {
        return;
    }
    let program = shared
        .confinement
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(program) = program {
        match crate::hardening::seccomp::apply(Role::Datapath, &program) {
            Ok(()) => shared.confined.store(true, Ordering::Release),
            Err(e) => error!(pair = shared.index, "{e}"),
        }
    }
}

/// Poll while busy; sleep until an fd fires otherwise — but only nap if the
/// TAP should be watched and could not be (or is failing), so frames on it
/// are still read.
fn wait_timeout(sleeping: bool, tap_as_wanted: bool) -> EpollTimeout {
    if !sleeping {
        EpollTimeout::ZERO
    } else if tap_as_wanted {
        EpollTimeout::NONE
    } else {
        EpollTimeout::from(RETRY_NAP_MS)
    }
}

impl Registration {
    /// Consumes the notifications epoll reported. Only the fds that fired
    /// are drained: draining another could swallow a kick that epoll has
    /// not reported yet.
    fn drain_fired(&self, events: &[EpollEvent], shared: &PairShared) {
        for event in events {
            match event.data() {
                WAKE => notify::drain(shared.wake.as_fd()),
                token @ (TX_KICK | RX_KICK) => {
                    if let Some((_, kick)) = self.kicks.iter().find(|(t, _)| *t == token) {
                        notify::drain(kick.as_fd());
                    }
                }
                _ => {}
            }
        }
    }

    /// Keeps the TAP in the epoll set only while the thread sleeps with
    /// buffers to fill. While it polls it reads the TAP on every pass
    /// anyway, and a TAP in an epoll set makes the kernel run epoll's
    /// wake-up callback for every frame queued on it, on the sending CPU,
    /// under locks the polling thread's `epoll_wait` keeps taking too. That
    /// cache-line traffic cost whoever sends into the TAP ~200 ns per frame
    /// (~12 % at 1500 bytes); the two `epoll_ctl` calls per sleep cost far
    /// less than the wake-up they come with. Level-triggered, so frames that
    /// arrived before the add still wake the thread.
    ///
    /// False while the set does not match `watch` (an `epoll_ctl` failed;
    /// retried on the next pass, logged once).
    fn watch_tap(&mut self, tap_fd: std::os::fd::BorrowedFd<'_>, watch: bool, pair: u16) -> bool {
        if watch == self.tap_watched {
            return true;
        }
        let result = if watch {
            self.epoll
                .add(tap_fd, EpollEvent::new(EpollFlags::EPOLLIN, TAP))
        } else {
            self.epoll.delete(tap_fd)
        };
        match result {
            // Already (not) there is what was asked for.
            Ok(()) | Err(Errno::EEXIST) | Err(Errno::ENOENT) => {
                self.tap_watched = watch;
                self.tap_ctl_failed = false;
            }
            Err(e) => {
                if !self.tap_ctl_failed {
                    warn!(pair, "epoll TAP (watch {watch}): {e}; retrying");
                }
                self.tap_ctl_failed = true;
            }
        }
        self.tap_watched == watch
    }
}

/// A fresh epoll set with the wake fd and the pair's kick fds (the TAP is
/// added only around sleeps: see `Registration::watch_tap`).
fn register(shared: &PairShared, generation: u64) -> nix::Result<Registration> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    epoll.add(
        shared.wake.as_fd(),
        EpollEvent::new(EpollFlags::EPOLLIN, WAKE),
    )?;
    let st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    let mut kicks = Vec::new();
    for (ring, token) in [(&st.tx, TX_KICK), (&st.rx, RX_KICK)] {
        if let Some(ring) = ring {
            epoll.add(
                ring.kick.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, token),
            )?;
            kicks.push((token, ring.kick.clone()));
        }
    }
    Ok(Registration {
        epoll,
        generation,
        kicks,
        tap_watched: false,
        tap_ctl_failed: false,
    })
}

/// One TX batch and one RX batch.
fn one_batch(
    shared: &PairShared,
    st: &mut PairState,
    tap_fd: std::os::fd::BorrowedFd<'_>,
    iov: &mut Vec<crate::memory::guest_memory::IoVec>,
) -> Pass {
    if st.paused {
        return Pass::default();
    }
    let Some(mem) = st.memory.clone() else {
        return Pass::default();
    };
    let mem = mem.mmap();
    let settings = st.settings.clone();
    let mut more = false;
    let mut worked = false;
    let mut tap_failing = false;
    if let Some(tx) = st.tx.as_mut() {
        let ctx = TxContext {
            mem,
            tap: tap_fd,
            hdr_len: settings.hdr_len,
            link_up: settings.link_up && st.active,
        };
        let (batch, tx_more) = process_tx(tx, &ctx, iov, BATCH);
        worked |= batch != Batch::default();
        shared.stats.add_tx(&batch);
        more |= tx_more;
    }
    // RX is tried on every pass (cheap when the ring is empty), so a kick
    // that raced with a drain cannot leave the ring starved for good.
    let rx_ready = st.active && settings.link_up;
    if let (Some(rx), true) = (st.rx.as_mut(), rx_ready) {
        let ctx = RxContext {
            mem,
            tap: tap_fd,
            hdr_len: settings.hdr_len,
            mergeable: settings.mergeable,
            frame_room: settings.frame_room,
            filter: &settings.filter,
            link_up: settings.link_up,
            dirty_log: settings.dirty_log.as_deref(),
        };
        let (batch, outcome) = process_rx(rx, &mut st.rx_pending, &ctx, BATCH);
        worked |= batch != Batch::default();
        shared.stats.add_rx(&batch);
        match outcome {
            RxOutcome::Budget => {
                st.rx_starved = false;
                more = true;
            }
            RxOutcome::NeedBuffers => st.rx_starved = true,
            RxOutcome::TapEmpty => st.rx_starved = false,
            RxOutcome::TapError => {
                st.rx_starved = false;
                tap_failing = true;
            }
        }
    }
    Pass {
        more: more && !tap_failing,
        want_tap: st.rx.is_some() && rx_ready && !st.rx_starved,
        worked,
        tap_failing,
    }
}
