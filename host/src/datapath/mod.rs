//! The packet hot path: threads moving frames between the guest's vrings
//! and the TAP queues, with no calls into wasm and no allocation per
//! packet. Each thread serves one or more queue pairs (see `threads_for`).
//!
//! - `vring.rs` — ring setup and start, defensive chain walking
//! - `tx.rs` / `rx.rs` — the two directions
//! - `tap_io.rs` — readv/writev on a TAP queue as raw system calls
//! - `rx_filter.rs` — the native receive filter
//! - `worker.rs` — a datapath thread and its epoll loop
//! - `notify.rs` — kick/call fds
//! - `rate_limit/` — the device's rate limits, shared by its pairs
//! - `tap_gone.rs` — the alarm raised when the TAP device is deleted
//! - `stats.rs` — counters
//! - `testing.rs` — guest RAM, a driver's ring and a fake TAP for the unit
//!   tests

pub mod notify;
pub mod rate_limit;
pub mod rx;
pub mod rx_filter;
pub mod stats;
pub mod tap_gone;
pub mod tap_io;
#[cfg(test)]
pub(crate) mod testing;
pub mod tx;
pub mod vring;
mod worker;

use crate::memory::dirty_log::DirtyLog;
use crate::memory::guest_memory::GuestMemory;
use crate::tap::{Tap, TapQueues};
use nix::sys::eventfd::{EfdFlags, EventFd};
use rate_limit::{LimitSpecs, RateLimits};
use rx::RxPending;
use rx_filter::NativeFilter;
use stats::{QueueStats, StatsSnapshot};
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use tap_gone::TapGone;
use virtio_queue::QueueT;
use vring::Vring;

/// How the datapath threads run (`sandnic serve` options).
#[derive(Debug, Clone, Copy)]
pub struct DatapathOptions {
    /// After moving packets a thread keeps polling this long before it
    /// sleeps in epoll: under traffic the next chain usually comes within
    /// microseconds, and a sleep/wake-up round trip costs more than the
    /// frames it waits for. Zero never polls (least CPU).
    pub busy_poll: std::time::Duration,
    /// How many datapath threads serve the queue pairs; `None` picks one
    /// per pair, up to the CPUs this process may run on.
    pub threads: Option<NonZeroUsize>,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        Self {
            busy_poll: std::time::Duration::from_micros(50),
            threads: None,
        }
    }
}

/// How many threads serve `pairs` queue pairs. More polling threads than
/// CPUs only take turns on a CPU, each spinning out its slice while the
/// other's frames wait; fewer threads than pairs share the pairs out, a
/// thread going round its pairs as a DPDK polling core goes round its
/// queues. The CPUs counted are those of the affinity mask (and cgroup
/// quota) the process starts with, as `std::thread::available_parallelism`
/// reports them: start sandnic under `taskset` or a cpuset to size it.
/// No pairs need no thread.
pub fn threads_for(pairs: usize, asked: Option<NonZeroUsize>) -> usize {
    let cpus = || std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    asked.map_or_else(cpus, NonZeroUsize::get).min(pairs)
}

/// What every pair needs to know about the negotiated device.
#[derive(Debug, Clone)]
pub struct Settings {
    pub hdr_len: usize,
    pub mergeable: bool,
    pub frame_room: u64,
    pub filter: Arc<NativeFilter>,
    pub link_up: bool,
    /// Set while a migration logs dirty pages (LOG_ALL acked, a log base
    /// given): RX marks the pages it writes.
    pub dirty_log: Option<Arc<DirtyLog>>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            hdr_len: 12,
            mergeable: false,
            frame_room: rx::MAX_FRAME,
            filter: Arc::default(),
            link_up: true,
            dirty_log: None,
        }
    }
}

/// One queue pair's datapath state. Only touched with the pair's mutex held.
pub struct PairState {
    /// Changed only by `set_memory`, which stops the rings on the old one.
    memory: Option<Arc<GuestMemory>>,
    pub rx: Option<Vring>,
    pub tx: Option<Vring>,
    pub rx_pending: RxPending,
    /// The guest gave no room for the next frame; wait for an RX kick.
    pub rx_starved: bool,
    pub settings: Settings,
    /// The pair is within the active queue pairs.
    pub active: bool,
    /// Bumped whenever the fds to poll change.
    pub generation: u64,
}

impl PairState {
    /// Stops one ring: pending RX buffers go back to the guest first. The
    /// next available index to process, if the ring ran.
    fn stop_ring(&mut self, dir: Direction) -> Option<u16> {
        let ring = match dir {
            Direction::Rx => {
                let ring = self.rx.as_mut()?;
                self.rx_pending.rewind(ring);
                ring
            }
            Direction::Tx => self.tx.as_mut()?,
        };
        let next = ring.queue.next_avail();
        match dir {
            Direction::Rx => self.rx = None,
            Direction::Tx => self.tx = None,
        }
        Some(next)
    }

    /// The only way the pair's memory changes: the RX buffers taken ahead
    /// hold raw pointers into the old mapping, so no ring runs across it.
    fn set_memory(&mut self, memory: Option<Arc<GuestMemory>>) {
        for dir in [Direction::Rx, Direction::Tx] {
            if self.stop_ring(dir).is_some() {
                tracing::warn!(?dir, "a ring still ran when guest memory changed; stopped");
            }
        }
        self.memory = memory;
    }
}

pub struct PairShared {
    pub index: u16,
    pub state: Mutex<PairState>,
    pub stats: QueueStats,
    busy_poll: std::time::Duration,
    wake: EventFd,
    stop: AtomicBool,
    /// A seccomp filter for the thread to put on itself (see `confine`).
    confinement: Mutex<Option<Arc<seccompiler::BpfProgram>>>,
    /// The thread has put its filter on.
    confined: AtomicBool,
    /// The thread's id once it runs (0 before).
    tid: AtomicI32,
    /// Shared by every pair: raised when the kernel detached the queues.
    tap_gone: Arc<TapGone>,
    /// Shared by every pair: the device's rate limits.
    limits: Arc<RateLimits>,
}

impl PairShared {
    fn new(
        index: u16,
        busy_poll: std::time::Duration,
        tap_gone: Arc<TapGone>,
        limits: Arc<RateLimits>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            index,
            state: Mutex::new(PairState {
                memory: None,
                rx: None,
                tx: None,
                rx_pending: RxPending::default(),
                rx_starved: false,
                settings: Settings::default(),
                active: index == 0,
                generation: 0,
            }),
            stats: QueueStats::default(),
            busy_poll,
            confinement: Mutex::new(None),
            confined: AtomicBool::new(false),
            tid: AtomicI32::new(0),
            wake: EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(std::io::Error::from)?,
            stop: AtomicBool::new(false),
            tap_gone,
            limits,
        })
    }

    fn lock(&self) -> MutexGuard<'_, PairState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self) {
        notify::signal(self.wake.as_fd());
    }
}

/// A pair's state as `status` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PairReport {
    pub active: bool,
    pub rx_running: bool,
    pub tx_running: bool,
    pub rx_pending_chains: usize,
    pub rx_waiting_for_buffers: bool,
    pub hdr_len: usize,
    pub frame_room: u64,
}

/// All queue pairs and their threads, on TAP queues `T`.
pub struct Datapath<T: TapQueues = Tap> {
    tap: Arc<T>,
    pairs: Vec<Arc<PairShared>>,
    threads: Vec<JoinHandle<()>>,
    tap_gone: Arc<TapGone>,
    limits: Arc<RateLimits>,
}

/// Which ring of a pair a virtqueue index is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Rx,
    Tx,
}

impl<T: TapQueues> Datapath<T> {
    /// Starts the threads for one pair per TAP queue (`threads_for`),
    /// idle until a ring is installed. Pair `i` goes to thread `i % n`.
    /// Only pair 0 is active until the device model enables more; the TAP's
    /// queue attachment is left to `set_active_pairs`.
    pub fn start(tap: Arc<T>, options: DatapathOptions) -> std::io::Result<Self> {
        let tap_gone = Arc::new(TapGone::new()?);
        let limits = Arc::new(RateLimits::default());
        let pairs = (0..tap.queue_count())
            .map(|index| {
                PairShared::new(
                    index as u16,
                    options.busy_poll,
                    tap_gone.clone(),
                    limits.clone(),
                )
                .map(Arc::new)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let n = threads_for(pairs.len(), options.threads);
        let mut threads = Vec::with_capacity(n);
        for thread in 0..n {
            let served: Vec<_> = pairs.iter().skip(thread).step_by(n).cloned().collect();
            let tap = tap.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("sandnic-dp{thread}"))
                    .spawn(move || worker::run(served, tap))?,
            );
        }
        Ok(Self {
            tap,
            pairs,
            threads,
            tap_gone,
            limits,
        })
    }

    pub fn tap(&self) -> &Arc<T> {
        &self.tap
    }

    /// Raised once the kernel has detached the TAP's queues (the device
    /// was deleted); the control thread watches its fd.
    pub fn tap_gone(&self) -> &TapGone {
        &self.tap_gone
    }

    /// The device's rate limits as set.
    pub fn limits(&self) -> LimitSpecs {
        self.limits.specs()
    }

    /// Sets both directions' limits at once (None removes one), and wakes
    /// every pair: one waiting for a turn under the old limit looks again.
    pub fn set_limits(&self, specs: LimitSpecs) {
        self.limits.set(specs);
        for pair in &self.pairs {
            pair.wake();
        }
    }

    /// Times a pair waited for its turn: (TX, RX).
    pub fn throttle_waits(&self) -> (u64, u64) {
        (self.limits.tx.waits(), self.limits.rx.waits())
    }

    /// The ids of the threads that run so far (a handover raises their
    /// priority for its pause: see `handover::priority`).
    pub fn thread_ids(&self) -> Vec<i32> {
        let mut ids: Vec<i32> = self
            .pairs
            .iter()
            .map(|p| p.tid.load(Ordering::Acquire))
            .filter(|&tid| tid != 0)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// How many threads serve the pairs.
    pub fn thread_count(&self) -> usize {
        self.threads.len()
    }

    pub fn pair_count(&self) -> usize {
        self.pairs.len()
    }

    /// Runs `f` on a pair's state at a batch boundary, then wakes its thread
    /// so it picks up changed fds.
    pub fn with_pair<R>(&self, pair: usize, f: impl FnOnce(&mut PairState) -> R) -> Option<R> {
        let shared = self.pairs.get(pair)?;
        let result = {
            let mut st = shared.lock();
            let r = f(&mut st);
            st.generation += 1;
            r
        };
        shared.wake();
        Some(result)
    }

    /// Stops ring `(pair, dir)`: pending RX buffers go back to the guest and
    /// the next available index is returned (GET_VRING_BASE).
    ///
    /// This is the GET_VRING_BASE barrier, and it holds by construction: a
    /// datapath thread touches a ring, its buffers and guest memory only
    /// inside a batch, with the pair's lock held, and it marks every page it
    /// writes in the dirty log before it releases the lock (`Vring`'s used
    /// ring writes, `rx::deliver`). This takes the same lock, so it returns
    /// at a batch boundary with every write before it logged, and it drops
    /// the ring: no thread can reach it, its buffers or its memory after.
    /// The frontend gets the answer only after this returns.
    /// (`tests/dirty_log.rs`: `get_vring_base_is_a_barrier_with_every_write_before_it_logged`.)
    pub fn stop_ring(&self, pair: usize, dir: Direction) -> Option<u16> {
        self.with_pair(pair, |st| st.stop_ring(dir)).flatten()
    }

    pub fn install_ring(&self, pair: usize, dir: Direction, ring: Vring) {
        self.with_pair(pair, |st| {
            st.rx_starved = false;
            match dir {
                Direction::Rx => st.rx = Some(ring),
                Direction::Tx => st.tx = Some(ring),
            }
        });
    }

    /// New guest memory for every pair. Callers stop the rings first and
    /// keep their positions (GET_VRING_BASE); a ring still running here is
    /// stopped with its pending RX buffers given back, so that nothing in
    /// the datapath points into a mapping the pair no longer holds.
    pub fn set_memory(&self, memory: Option<Arc<GuestMemory>>) {
        for pair in 0..self.pairs.len() {
            self.with_pair(pair, |st| st.set_memory(memory.clone()));
        }
    }

    pub fn set_settings(&self, settings: &Settings) {
        for pair in 0..self.pairs.len() {
            self.with_pair(pair, |st| st.settings = settings.clone());
        }
    }

    /// Serves pairs `0..n` and detaches the TAP queues of the others so the
    /// kernel steers nothing to a queue nobody reads.
    pub fn set_active_pairs(&self, n: usize) {
        for pair in 0..self.pairs.len() {
            let active = pair < n;
            let _ = self.tap.set_queue_attached(pair, active);
            self.with_pair(pair, |st| st.active = active);
        }
    }

    /// Has every datapath thread put `program` on itself (a thread can
    /// only filter itself) and waits until they have (each pair reports
    /// for the thread that serves it). Call once, after
    /// privileges were dropped.
    pub fn confine(&self, program: Arc<seccompiler::BpfProgram>) -> Result<(), NotConfined> {
        for p in &self.pairs {
            *p.confinement.lock().unwrap_or_else(|e| e.into_inner()) = Some(program.clone());
            p.wake();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !self
            .pairs
            .iter()
            .all(|p| p.confined.load(Ordering::Acquire))
        {
            if std::time::Instant::now() > deadline {
                return Err(NotConfined);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }

    /// What each pair is doing, for `status` (takes each pair's lock briefly).
    pub fn pair_states(&self) -> Vec<PairReport> {
        self.pairs
            .iter()
            .map(|p| {
                let st = p.lock();
                PairReport {
                    active: st.active,
                    rx_running: st.rx.is_some(),
                    tx_running: st.tx.is_some(),
                    rx_pending_chains: st.rx_pending.len(),
                    rx_waiting_for_buffers: st.rx_starved,
                    hdr_len: st.settings.hdr_len,
                    frame_room: st.settings.frame_room,
                }
            })
            .collect()
    }

    pub fn stats(&self) -> Vec<StatsSnapshot> {
        self.pairs.iter().map(|p| p.stats.snapshot()).collect()
    }

    /// Goes on counting from `snapshots` (a handover's source's counters).
    pub fn restore_stats(&self, snapshots: &[StatsSnapshot]) {
        for (pair, snapshot) in self.pairs.iter().zip(snapshots) {
            pair.stats.restore(snapshot);
        }
    }
}

impl<T: TapQueues> Drop for Datapath<T> {
    fn drop(&mut self) {
        for p in &self.pairs {
            p.stop.store(true, Ordering::Release);
            p.wake();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn threads_follow_the_option_and_never_outnumber_pairs() {
        let asked = |n| NonZeroUsize::new(n);
        assert_eq!(threads_for(4, asked(1)), 1);
        assert_eq!(threads_for(4, asked(3)), 3);
        assert_eq!(threads_for(2, asked(8)), 2);
        // No pairs, no threads (a thread with nothing to serve would
        // sleep in an empty epoll set for good).
        assert_eq!(threads_for(0, asked(2)), 0);
    }

    use super::testing::{eventually, frame, Buffer, DriverRing, FakeTap, GuestRam};
    use super::*;

    /// A running datapath on a fake TAP of `pairs` queues, with guest RAM.
    fn running(pairs: usize, settings: Settings) -> (Datapath<FakeTap>, Arc<FakeTap>, GuestRam) {
        let tap = FakeTap::new(pairs);
        let options = DatapathOptions {
            busy_poll: std::time::Duration::ZERO,
            threads: NonZeroUsize::new(1),
        };
        let datapath = Datapath::start(tap.clone(), options).unwrap();
        let ram = GuestRam::new();
        datapath.set_memory(Some(ram.memory.clone()));
        datapath.set_settings(&settings);
        (datapath, tap, ram)
    }

    fn install(datapath: &Datapath<FakeTap>, ram: &GuestRam, driver: &DriverRing, dir: Direction) {
        let index = if dir == Direction::Rx { 0 } else { 1 };
        let ring = Vring::start(index, &driver.setup(), &ram.memory, false, None).unwrap();
        datapath.install_ring(0, dir, ring);
    }

    #[test]
    fn the_worker_moves_frames_both_ways_and_signals_the_driver() {
        let (datapath, tap, ram) = running(1, Settings::default());
        let mut rx = DriverRing::new(&ram, 64);
        let mut tx = DriverRing::new(&ram, 64);
        install(&datapath, &ram, &rx, Direction::Rx);
        install(&datapath, &ram, &tx, Direction::Tx);
        assert_eq!(
            (rx.notifications(), tx.notifications()),
            (1, 1),
            "start signals"
        );
        // Guest → TAP: offered and kicked.
        let sent = frame(200, 5);
        let addr = ram.alloc(sent.len() as u64);
        ram.write(addr, &sent);
        tx.offer(
            &ram,
            &[Buffer {
                addr,
                len: sent.len() as u32,
                device_writes: false,
            }],
        );
        tx.kick();
        assert_eq!(tap.written(0), Some(sent));
        assert!(
            eventually(|| tx.notifications() > 0),
            "TX completion signalled"
        );
        assert_eq!(tx.take_used(&ram), vec![(0, 0)]);
        // TAP → guest: a buffer given, then a frame arriving.
        let at = ram.alloc(2048);
        rx.offer(
            &ram,
            &[Buffer {
                addr: at,
                len: 2048,
                device_writes: true,
            }],
        );
        rx.kick();
        let arriving = frame(300, 6);
        tap.inject(0, &arriving);
        assert!(eventually(|| rx.notifications() > 0), "RX signalled");
        assert_eq!(rx.take_used(&ram), vec![(0, 312)]);
        assert_eq!(ram.read(at + 12, 300), arriving[12..]);
        let stats = datapath.stats();
        assert_eq!((stats[0].tx_packets, stats[0].rx_packets), (1, 1));
    }

    #[test]
    fn new_memory_gives_back_every_rx_buffer_taken_ahead() {
        let settings = Settings {
            mergeable: true,
            ..Settings::default()
        };
        let (datapath, _tap, ram) = running(1, settings);
        let mut rx = DriverRing::new(&ram, 16);
        for _ in 0..12 {
            let addr = ram.alloc(1024);
            rx.offer(
                &ram,
                &[Buffer {
                    addr,
                    len: 1024,
                    device_writes: true,
                }],
            );
        }
        install(&datapath, &ram, &rx, Direction::Rx);
        assert!(
            eventually(|| datapath.pair_states()[0].rx_pending_chains > 0),
            "buffers taken ahead of a frame"
        );
        // Without stopping the ring first: the datapath stops it itself.
        datapath.set_memory(Some(GuestRam::new().memory));
        let state = &datapath.pair_states()[0];
        assert_eq!((state.rx_running, state.rx_pending_chains), (false, 0));
        assert_eq!(
            datapath.stop_ring(0, Direction::Rx),
            None,
            "already stopped"
        );
    }

    #[test]
    fn only_active_pairs_keep_their_tap_queue_attached() {
        let (datapath, tap, _ram) = running(3, Settings::default());
        datapath.set_active_pairs(2);
        assert!(tap.attached(0) && tap.attached(1) && !tap.attached(2));
        datapath.set_active_pairs(3);
        assert!(tap.attached(2));
    }

    #[test]
    fn by_default_one_thread_per_pair_up_to_the_cpus() {
        let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        assert_eq!(threads_for(1, None), 1);
        assert_eq!(threads_for(64, None), cpus.min(64));
    }
}

/// A datapath thread did not take its seccomp filter in time.
#[derive(Debug, thiserror::Error)]
#[error("a datapath thread did not put its seccomp filter on within 5 s")]
pub struct NotConfined;
