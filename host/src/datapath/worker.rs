//! A datapath thread: serves one or more queue pairs, waiting on their TX
//! and RX kick fds, their TAP queues and their wake fds in one epoll set,
//! and moving packets in batches.
//!
//! Why several pairs per thread: when pairs outnumber the CPUs the process
//! may run on, a thread per pair makes the scheduler switch between
//! pollers on one CPU, and each poller spins out its slice while the other
//! pair's frames wait. One thread going round the pairs in turn (as a DPDK
//! polling core does) spends that CPU on frames. `Datapath::start` decides
//! how many threads there are.
//!
//! All state the thread works on for a pair sits in `PairState` behind the
//! pair's mutex, held for one batch at a time. The control thread takes the
//! same mutex to reconfigure the pair, so every change (new memory, a
//! stopped ring, a pause for handover) lands exactly at a batch boundary.

use super::notify;
use super::rate_limit::{Allowance, DirectionLimit, Take};
use super::rx::{process_rx, RxContext, RxOutcome};
use super::stats::Batch;
use super::tx::{process_tx, TxContext};
use super::{PairShared, PairState};
use crate::hardening::allowlists::Role;
use crate::tap::TapQueues;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, warn};

/// Chains or frames per batch: bounds how long the lock is held and keeps
/// notifications coalesced.
pub const BATCH: usize = 256;
/// How long to sleep, in ms, when a TAP cannot be put in the epoll set,
/// and how long a pair whose TAP fails waits before it is read again.
const RETRY_NAP_MS: u8 = 1;
const RETRY_NAP: Duration = Duration::from_millis(RETRY_NAP_MS as u64);

/// An epoll token is `slot * TOKENS_PER_PAIR + kind`, `slot` being the
/// pair's place in this thread's list.
const TOKENS_PER_PAIR: u64 = 4;
const WAKE: u64 = 0;
const TX_KICK: u64 = 1;
const RX_KICK: u64 = 2;
const TAP: u64 = 3;

/// A pair this thread serves.
struct Served<'tap> {
    shared: Arc<PairShared>,
    tap_fd: BorrowedFd<'tap>,
    last: Pass,
    last_work: Instant,
    /// Gets a pass this time round (see `run`).
    due: bool,
    /// While its TAP fails: when to read it again (a busy neighbour keeps
    /// the thread polling, and a failing read each pass would spin).
    retry_at: Instant,
}

impl Served<'_> {
    /// Worth another pass without sleeping: a budget ran out, or traffic
    /// moved within the busy-poll window. A failing TAP is never polled
    /// (that would spin), and a throttled pair waits for its turn on a
    /// timer: busy polling is for frames that move.
    fn polling(&self, now: Instant) -> bool {
        let recent = now.duration_since(self.last_work) < self.shared.busy_poll;
        !self.last.tap_failing
            && (self.last.more || (recent && self.last.throttled_until.is_none()))
    }

    /// Its turn under a rate limit has come.
    fn turn_due(&self, now: Instant) -> bool {
        self.last.throttled_until.is_some_and(|t| now >= t)
    }
}

/// The fds the thread currently polls; rebuilt when the control thread
/// changes one of its pairs (the pair's generation moves).
struct Registration {
    epoll: Epoll,
    /// Per slot (a pair's place in the thread's list).
    slots: Vec<SlotRegistration>,
    /// Kick fds with their tokens (held open while registered).
    kicks: Vec<(u64, Arc<OwnedFd>)>,
}

/// One pair's part of a `Registration`.
#[derive(Debug, Clone, Copy)]
struct SlotRegistration {
    /// The generation the pair's fds were taken from.
    generation: u64,
    /// The TAP is in the set.
    tap_watched: bool,
    /// The last `epoll_ctl` on the TAP failed (logged once, not per retry).
    tap_ctl_failed: bool,
}

/// What one pass over a pair's rings found.
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
    /// A rate limit holds frames back (TX in the ring, RX in the TAP)
    /// until then.
    throttled_until: Option<Instant>,
}

/// Serves `pairs` until the datapath stops.
pub fn run<T: TapQueues>(pairs: Vec<Arc<PairShared>>, tap: Arc<T>) {
    let tid = nix::unistd::gettid().as_raw();
    let mut served = Vec::with_capacity(pairs.len());
    for shared in pairs {
        shared.tid.store(tid, Ordering::Release);
        match tap.queue(usize::from(shared.index)) {
            Some(tap_fd) => served.push(Served {
                shared,
                tap_fd,
                last: Pass::default(),
                last_work: Instant::now(),
                due: true,
                retry_at: Instant::now(),
            }),
            None => error!(pair = shared.index, "no TAP queue for this pair"),
        }
    }
    if served.is_empty() {
        // Nothing would ever wake the thread (and `Drop` joins it).
        return;
    }
    let indices: Vec<u16> = served.iter().map(|s| s.shared.index).collect();
    let mut iov = Vec::with_capacity(64);
    let mut reg: Option<Registration> = None;
    let mut events = [EpollEvent::empty(); 16];
    while !served.iter().any(|s| s.shared.stop.load(Ordering::Acquire)) {
        confine_if_asked(&served);
        if reg.is_none() {
            match register(&served) {
                Ok(r) => {
                    reg = Some(r);
                    // The wakes that announced the change may already be
                    // consumed: look at the rings once before sleeping.
                    served.iter_mut().for_each(|s| s.last.more = true);
                }
                Err(e) => {
                    error!(pairs = ?indices, "datapath epoll setup failed: {e}");
                    return;
                }
            }
        }
        let r = reg.as_mut().expect("registered above");
        let now = Instant::now();
        let mut sleeping = true;
        let mut taps_as_wanted = true;
        for (slot, s) in served.iter_mut().enumerate() {
            // A pair that polls reads its TAP on every pass; one that does
            // not has it watched, even while a busy neighbour keeps the
            // thread polling.
            let polling = s.polling(now);
            sleeping &= !polling;
            let watch = s.last.want_tap && !polling && !s.last.tap_failing;
            let as_wanted = r.watch_tap(slot, s.tap_fd, watch, s.shared.index);
            taps_as_wanted &= as_wanted && !s.last.tap_failing;
            // A pair whose fds all sit in the set gets a pass only when
            // one of them fires (or, with its TAP failing, once its retry
            // is due): an idle pair beside a busy one costs no TAP read
            // per pass.
            s.due = polling || !as_wanted || s.turn_due(now);
            sleeping &= !s.turn_due(now);
        }
        let next_turn = served.iter().filter_map(|s| s.last.throttled_until).min();
        let timeout = wait_timeout(sleeping, taps_as_wanted, next_turn, now);
        let n = match r.epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                error!(pairs = ?indices, "datapath epoll_wait: {e}");
                return;
            }
        };
        r.drain_fired(&events[..n], &mut served);
        let mut stale = false;
        let now = Instant::now();
        for (slot, s) in served.iter_mut().enumerate() {
            let retry = s.last.tap_failing && now >= s.retry_at;
            if !(s.due || retry || s.turn_due(now)) {
                continue;
            }
            let mut st = s.shared.lock();
            if st.generation != r.slots[slot].generation {
                stale = true;
                continue;
            }
            s.last = one_batch(&s.shared, &mut st, s.tap_fd, &mut iov);
            drop(st);
            if s.last.worked {
                s.last_work = Instant::now();
            }
            if s.last.tap_failing {
                s.retry_at = Instant::now() + RETRY_NAP;
            }
        }
        if stale {
            reg = None;
        }
    }
}

/// Puts the seccomp filter the control thread handed over on this thread
/// (once for all its pairs; checked once per pass, under uncontended
/// locks).
fn confine_if_asked(served: &[Served<'_>]) {
    if served
        .iter()
        .all(|s| s.shared.confined.load(Ordering::Relaxed))
    {
        return;
    }
    let program = served.iter().find_map(|s| {
        s.shared
            .confinement
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    });
    let Some(program) = program else {
        return;
    };
    match crate::hardening::seccomp::apply(Role::Datapath, &program) {
        Ok(()) => served
            .iter()
            .for_each(|s| s.shared.confined.store(true, Ordering::Release)),
        Err(e) => error!("{e}"),
    }
}

/// Poll while busy; sleep until an fd fires otherwise — but only nap if a
/// TAP should be watched and could not be (or is failing), so frames on it
/// are still read — and no longer than until the next pair's turn under a
/// rate limit (`next_turn`).
fn wait_timeout(
    sleeping: bool,
    taps_as_wanted: bool,
    next_turn: Option<Instant>,
    now: Instant,
) -> EpollTimeout {
    if !sleeping {
        return EpollTimeout::ZERO;
    }
    let nap = (!taps_as_wanted).then_some(RETRY_NAP);
    let turn = next_turn.map(|t| t.saturating_duration_since(now));
    match nap.into_iter().chain(turn).min() {
        None => EpollTimeout::NONE,
        // Rounded up: waking before the turn would only find it not due.
        Some(d) => {
            let ms = d.as_micros().div_ceil(1000).min(u128::from(u16::MAX));
            EpollTimeout::from(ms as u16)
        }
    }
}

fn token(slot: usize, kind: u64) -> u64 {
    slot as u64 * TOKENS_PER_PAIR + kind
}

impl Registration {
    /// Consumes the notifications epoll reported and marks their pairs
    /// due. Only the fds that fired are drained: draining another could
    /// swallow a kick that epoll has not reported yet.
    fn drain_fired(&self, events: &[EpollEvent], served: &mut [Served<'_>]) {
        for event in events {
            let token = event.data();
            let Some(s) = served.get_mut((token / TOKENS_PER_PAIR) as usize) else {
                continue;
            };
            s.due = true;
            match token % TOKENS_PER_PAIR {
                WAKE => notify::drain(s.shared.wake.as_fd()),
                TX_KICK | RX_KICK => {
                    if let Some((_, kick)) = self.kicks.iter().find(|(t, _)| *t == token) {
                        notify::drain(kick.as_fd());
                    }
                }
                _ => {}
            }
        }
    }

    /// Keeps a pair's TAP in the epoll set only while the pair is idle
    /// with buffers to fill. While the pair polls the thread reads its TAP
    /// on every pass anyway, and a TAP in an epoll set makes the kernel run
    /// epoll's wake-up callback for every frame queued on it, on the
    /// sending CPU, under locks the polling thread's `epoll_wait` keeps
    /// taking too. That cache-line traffic cost whoever sends into the TAP
    /// ~200 ns per frame (~12 % at 1500 bytes); the two `epoll_ctl` calls
    /// per sleep cost far less than the wake-up they come with.
    /// Level-triggered, so frames that arrived before the add still wake
    /// the thread.
    ///
    /// False while the set does not match `watch` (an `epoll_ctl` failed;
    /// retried on the next pass, logged once).
    fn watch_tap(&mut self, slot: usize, tap_fd: BorrowedFd<'_>, watch: bool, pair: u16) -> bool {
        let state = &mut self.slots[slot];
        if watch == state.tap_watched {
            return true;
        }
        let result = if watch {
            self.epoll.add(
                tap_fd,
                EpollEvent::new(EpollFlags::EPOLLIN, token(slot, TAP)),
            )
        } else {
            self.epoll.delete(tap_fd)
        };
        match result {
            // Already (not) there is what was asked for.
            Ok(()) | Err(Errno::EEXIST) | Err(Errno::ENOENT) => {
                state.tap_watched = watch;
                state.tap_ctl_failed = false;
            }
            Err(e) => {
                if !state.tap_ctl_failed {
                    warn!(pair, "epoll TAP (watch {watch}): {e}; retrying");
                }
                state.tap_ctl_failed = true;
            }
        }
        state.tap_watched == watch
    }
}

/// A fresh epoll set with every served pair's wake fd and kick fds (the
/// TAPs are added only around sleeps: see `Registration::watch_tap`).
fn register(served: &[Served<'_>]) -> nix::Result<Registration> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let mut slots = Vec::with_capacity(served.len());
    let mut kicks = Vec::new();
    for (slot, s) in served.iter().enumerate() {
        epoll.add(
            s.shared.wake.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, token(slot, WAKE)),
        )?;
        let st = s.shared.lock();
        slots.push(SlotRegistration {
            generation: st.generation,
            tap_watched: false,
            tap_ctl_failed: false,
        });
        for (ring, kind) in [(&st.tx, TX_KICK), (&st.rx, RX_KICK)] {
            if let Some(ring) = ring {
                let token = token(slot, kind);
                epoll.add(
                    ring.kick.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, token),
                )?;
                kicks.push((token, ring.kick.clone()));
            }
        }
    }
    Ok(Registration {
        epoll,
        slots,
        kicks,
    })
}

/// One TX batch and one RX batch, each within its rate limit's turn.
fn one_batch(
    shared: &PairShared,
    st: &mut PairState,
    tap_fd: std::os::fd::BorrowedFd<'_>,
    iov: &mut Vec<crate::memory::guest_memory::IoVec>,
) -> Pass {
    let Some(mem) = st.memory.clone() else {
        return Pass::default();
    };
    let mem = mem.mmap();
    let settings = st.settings.clone();
    let limits = &shared.limits;
    let now = Instant::now();
    let mut more = false;
    let mut worked = false;
    let mut tap_failing = false;
    let mut throttled_until = None;
    if let Some(tx) = st.tx.as_mut() {
        let ctx = TxContext {
            mem,
            tap: tap_fd,
            hdr_len: settings.hdr_len,
            link_up: settings.link_up && st.active,
        };
        match turn(&limits.tx, shared.index, now, || tx.has_chains(mem)) {
            Take::WaitUntil(t) => throttled_until = Some(t),
            // Idle, `process_tx` passes nothing (its allowance is empty)
            // but still re-enables the driver's kicks, which a pass that
            // ended throttled or on its budget left off: skipping it would
            // leave the next chains waiting for a kick that never comes.
            take => {
                let mut allowance = allowance_of(take);
                let (batch, tx_more) = process_tx(tx, &ctx, iov, BATCH, &mut allowance);
                give_back(&limits.tx, take, allowance);
                worked |= batch != Batch::default();
                shared.stats.add_tx(&batch);
                more |= tx_more;
            }
        }
    }
    // RX is tried on every pass (cheap when the ring is empty), so a kick
    // that raced with a drain cannot leave the ring starved for good.
    let rx_ready = st.active && settings.link_up && !shared.tap_gone.is_gone();
    let mut rx_throttled = false;
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
        match turn(&limits.rx, shared.index, now, || tap_readable(tap_fd)) {
            Take::WaitUntil(t) => {
                rx_throttled = true;
                throttled_until = Some(throttled_until.map_or(t, |u: Instant| u.min(t)));
            }
            // Nothing in the TAP: it stays watched (`want_tap`).
            Take::Idle => st.rx_starved = false,
            take => {
                let mut allowance = allowance_of(take);
                let (batch, outcome) =
                    process_rx(rx, &mut st.rx_pending, &ctx, BATCH, &mut allowance);
                give_back(&limits.rx, take, allowance);
                worked |= batch != Batch::default();
                shared.stats.add_rx(&batch);
                match outcome {
                    // Spent: the next pass asks for the next turn.
                    RxOutcome::Budget | RxOutcome::Throttled => {
                        st.rx_starved = false;
                        more = true;
                    }
                    RxOutcome::NeedBuffers => st.rx_starved = true,
                    RxOutcome::TapEmpty => st.rx_starved = false,
                    RxOutcome::TapError => {
                        st.rx_starved = false;
                        tap_failing = true;
                    }
                    RxOutcome::TapGone => shared.tap_gone.raise(),
                }
            }
        }
    }
    Pass {
        more: more && !tap_failing,
        // A throttled RX leaves the TAP out of the set: it stays readable,
        // and the turn's timer wakes the thread instead.
        want_tap: st.rx.is_some()
            && rx_ready
            && !st.rx_starved
            && !rx_throttled
            && !shared.tap_gone.is_gone(),
        worked,
        tap_failing,
        throttled_until,
    }
}

/// What a direction may do on this pass: `Take::Unlimited` without a look
/// at the ring when no limit is set; under a limit, `Take::Idle` when
/// nothing is waiting (`has_work`), so an idle pair takes no turn and
/// holds no place.
fn turn(limit: &DirectionLimit, pair: u16, now: Instant, has_work: impl FnOnce() -> bool) -> Take {
    if !limit.is_limited() {
        return Take::Unlimited;
    }
    if !has_work() {
        limit.leave(pair);
        return Take::Idle;
    }
    limit.take(pair, now)
}

fn allowance_of(take: Take) -> Allowance {
    match take {
        Take::Granted(allowance) => allowance,
        Take::Idle => Allowance::none(),
        Take::Unlimited | Take::WaitUntil(_) => Allowance::unlimited(),
    }
}

fn give_back(limit: &DirectionLimit, take: Take, left: Allowance) {
    if matches!(take, Take::Granted(_)) {
        limit.give_back(left);
    }
}

/// Whether the TAP queue holds a frame (a zero-timeout poll): under an RX
/// limit a pair asks for a turn only with frames waiting.
fn tap_readable(tap: BorrowedFd<'_>) -> bool {
    let mut fds = [nix::poll::PollFd::new(tap, nix::poll::PollFlags::POLLIN)];
    matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
}
