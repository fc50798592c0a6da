//! Receive: TAP → guest. Frames are read with one `readv` straight into the
//! guest's buffers. Never a partial frame: the read is offered more room
//! than the largest frame that can arrive, and a read that fills everything
//! offered is treated as truncated and dropped.
//!
//! With MRG_RXBUF a frame may span several chains (`num_buffers` in the
//! header says how many). Chains are popped ahead of need and kept in
//! `RxPending`; a frame the filter rejects leaves them pending for the next
//! one. Pending chains are rewound (given back to the available ring) when
//! the ring stops, so the guest loses no buffers.

use super::rate_limit::Allowance;
use super::rx_filter::NativeFilter;
use super::stats::Batch;
use super::tap_io;
use super::vring::{chain_iovecs, log_iov_write, read_iov, write_iov, Vring};
use crate::memory::dirty_log::DirtyLog;
use crate::memory::guest_memory::IoVec;
use nix::errno::Errno;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

/// Room needed for any frame when segmentation offloads are on.
pub const MAX_GSO_FRAME: u64 = 65_550;
/// Room needed for any frame without them (a 9000-byte MTU, VLAN tagged).
pub const MAX_FRAME: u64 = 9_022;
/// Most segments handed to one `readv`: the kernel's IOV_MAX. The guest
/// chooses how small its buffers are; offered more segments than this,
/// `readv` fails with EINVAL without reading, and the frame never leaves
/// the TAP.
pub const MAX_READ_SEGMENTS: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Pending {
    head: u16,
    segments: usize,
    capacity: u64,
    bad: bool,
}

/// Chains popped from the RX ring but not yet used, with their host
/// buffers. The buffers point into the guest memory mapping current when
/// they were popped: the owner must `rewind` before that mapping changes.
#[derive(Debug, Default)]
pub struct RxPending {
    chains: VecDeque<Pending>,
    iov: Vec<IoVec>,
}

// SAFETY: the raw pointers in `iov` point into guest memory mappings owned
// by the same `PairState` (behind its mutex), never into thread-local data.
unsafe impl Send for RxPending {}

impl RxPending {
    pub fn len(&self) -> usize {
        self.chains.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// Gives every pending chain back to the available ring.
    pub fn rewind(&mut self, ring: &mut Vring) {
        ring.untake(self.chains.len() as u16);
        self.chains.clear();
        self.iov.clear();
    }

    /// The good chains at the front that one `readv` can fill.
    fn usable(&self) -> Usable {
        let mut usable = Usable::default();
        for c in &self.chains {
            if c.bad {
                usable.blocked = true;
                break;
            }
            if usable.segments + c.segments > MAX_READ_SEGMENTS {
                usable.capped = true;
                break;
            }
            usable.room += c.capacity;
            usable.chains += 1;
            usable.segments += c.segments;
        }
        usable
    }

    fn consume(&mut self, chains: usize) {
        let segments: usize = self.chains.drain(..chains).map(|c| c.segments).sum();
        self.iov.drain(..segments);
    }

    fn pop_into(&mut self, ring: &mut Vring, mem: &GuestMemoryMmap) -> bool {
        let Some(chain) = ring.pop(mem) else {
            return false;
        };
        let head = chain.head_index();
        let before = self.iov.len();
        let result = chain_iovecs(chain, mem, true, u64::from(u32::MAX), &mut self.iov);
        let (capacity, bad) = match result {
            Ok(capacity) => (capacity, false),
            Err(_) => (0, true),
        };
        self.chains.push_back(Pending {
            head,
            segments: self.iov.len() - before,
            capacity,
            bad,
        });
        true
    }
}

/// What the next read can use: the good chains at the front of the pending
/// list, up to the first bad one or the segment cap.
#[derive(Debug, Default, Clone, Copy)]
struct Usable {
    room: u64,
    chains: usize,
    segments: usize,
    /// A bad chain follows: popping more cannot add room to this read.
    blocked: bool,
    /// The next good chain would pass MAX_READ_SEGMENTS.
    capped: bool,
}

pub struct RxContext<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub tap: BorrowedFd<'a>,
    pub hdr_len: usize,
    pub mergeable: bool,
    /// Room to gather before reading (see MAX_FRAME / MAX_GSO_FRAME).
    pub frame_room: u64,
    pub filter: &'a NativeFilter,
    pub link_up: bool,
    /// While a migration logs dirty pages: where delivered frames are
    /// marked.
    pub dirty_log: Option<&'a DirtyLog>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// The TAP has nothing more to read.
    TapEmpty,
    /// The guest has not given enough buffers; wait for its kick.
    NeedBuffers,
    /// The budget ran out with the TAP maybe still readable.
    Budget,
    /// Reading the TAP failed, and so did discarding a frame from it: try
    /// again later rather than at once (the TAP may stay readable).
    TapError,
    /// The kernel detached the queue: the TAP device is gone, for good.
    TapGone,
    /// The rate limit's allowance is spent: the next frames wait in the
    /// TAP for the pair's next turn.
    Throttled,
}

/// Moves up to `budget` frames from the TAP into the guest, while
/// `allowance` (the rate limit's) lasts. Every frame read from the TAP is
/// charged, delivered or not: it left the TAP's queue.
pub fn process_rx(
    ring: &mut Vring,
    pending: &mut RxPending,
    ctx: &RxContext<'_>,
    budget: usize,
    allowance: &mut Allowance,
) -> (Batch, RxOutcome) {
    let mut batch = Batch::default();
    let mut outcome = RxOutcome::Budget;
    for _ in 0..budget {
        if !allowance.allows_another() {
            outcome = RxOutcome::Throttled;
            break;
        }
        if !gather(ring, pending, ctx, &mut batch) {
            outcome = RxOutcome::NeedBuffers;
            break;
        }
        let usable = pending.usable();
        let n = match read_frame(ctx.tap, &pending.iov[..usable.segments]) {
            Ok(n) => n as u64,
            Err(Errno::EAGAIN) => {
                outcome = RxOutcome::TapEmpty;
                break;
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EBADFD) => {
                outcome = RxOutcome::TapGone;
                break;
            }
            Err(_) => {
                batch.errors += 1;
                match discard_frame(ctx.tap) {
                    Ok(()) => continue,
                    Err(Errno::EAGAIN) => outcome = RxOutcome::TapEmpty,
                    Err(_) => outcome = RxOutcome::TapError,
                }
                break;
            }
        };
        allowance.charge(n.saturating_sub(ctx.hdr_len as u64));
        if n >= usable.room || n <= ctx.hdr_len as u64 || !ctx.link_up {
            batch.drops += 1;
            continue;
        }
        let mut head = [0u8; 18];
        // SAFETY: the pending buffers point into `ctx.mem`, which the
        // caller keeps mapped for this call (rewound before it changes).
        let got = unsafe { read_iov(&pending.iov, ctx.hdr_len, &mut head) };
        if !ctx
            .filter
            .accepts(&head[..got.min(n as usize - ctx.hdr_len)])
        {
            batch.filtered += 1;
            continue;
        }
        deliver(ring, pending, ctx, n, usable.chains);
        batch.packets += 1;
        batch.bytes += n - ctx.hdr_len as u64;
    }
    if batch.packets > 0 || batch.bad_chains > 0 {
        ring.notify(ctx.mem);
    }
    (batch, outcome)
}

/// One `readv` from the TAP into `iov` (at most MAX_READ_SEGMENTS long).
fn read_frame(tap: BorrowedFd<'_>, iov: &[IoVec]) -> Result<usize, Errno> {
    // SAFETY: the iovecs point into guest buffers the guest handed to the
    // device (device-writable, inside the guest memory the caller keeps
    // mapped for the call); the kernel writes at most their total length.
    let n = unsafe { tap_io::readv(tap, iov) };
    if n < 0 {
        Err(Errno::last())
    } else {
        Ok(n as usize)
    }
}

/// Takes one frame off the TAP and drops it, so a read that keeps failing
/// for this frame cannot keep the TAP readable forever. A TAP read consumes
/// the frame even when the buffer is too short for it.
fn discard_frame(tap: BorrowedFd<'_>) -> Result<(), Errno> {
    let mut scratch = [0u8; 64];
    nix::unistd::read(tap.as_raw_fd(), &mut scratch)
        .map(drop)
        .or_else(|e| match e {
            // Too short for the vnet header: consumed all the same.
            Errno::EINVAL => Ok(()),
            e => Err(e),
        })
}

/// Malformed chains at the front are returned to the guest unused.
fn return_bad_chains(
    ring: &mut Vring,
    pending: &mut RxPending,
    mem: &GuestMemoryMmap,
    batch: &mut Batch,
) {
    while pending.chains.front().is_some_and(|c| c.bad) {
        let head = pending.chains[0].head;
        pending.consume(1);
        ring.push_used(mem, head, 0);
        batch.bad_chains += 1;
    }
}

/// Pops chains until there is room for the largest frame (mergeable) or one
/// chain (not mergeable), returning malformed chains to the guest as they
/// reach the front. False when the guest must give more buffers first.
///
/// A bad chain popped onto an empty list must go back at once: left at the
/// front, it would hide every good chain popped behind it, and the worker
/// would wait for buffers while holding them all.
fn gather(
    ring: &mut Vring,
    pending: &mut RxPending,
    ctx: &RxContext<'_>,
    batch: &mut Batch,
) -> bool {
    loop {
        return_bad_chains(ring, pending, ctx.mem, batch);
        let usable = pending.usable();
        let enough = if ctx.mergeable {
            usable.room > ctx.frame_room
        } else {
            usable.chains > 0
        };
        if enough || (usable.chains > 0 && (usable.blocked || usable.capped)) {
            return true;
        }
        if !pending.pop_into(ring, ctx.mem) {
            // Every buffer of the ring is pending: use what there is.
            if usable.chains > 0 && pending.len() >= usize::from(ring.queue.size()) {
                return true;
            }
            if ring.enable_and_recheck(ctx.mem) {
                continue;
            }
            return false;
        }
        ring.disable_notification(ctx.mem);
    }
}

/// Hands a frame of `n` bytes, read into the first chains, to the guest.
fn deliver(
    ring: &mut Vring,
    pending: &mut RxPending,
    ctx: &RxContext<'_>,
    n: u64,
    available: usize,
) {
    let mut count = 0;
    let mut left = n;
    for c in pending.chains.iter().take(available) {
        count += 1;
        if c.capacity >= left {
            break;
        }
        left -= c.capacity;
    }
    if ctx.hdr_len >= 12 {
        // num_buffers must be in place before the used ring says so.
        // SAFETY: as in `process_rx`; RX chains are device-writable (the
        // walker checked every descriptor).
        unsafe { write_iov(&pending.iov, 10, &(count as u16).to_le_bytes()) };
    }
    if let Some(log) = ctx.dirty_log {
        // The frame and its header (num_buffers included) lie in the first
        // n bytes.
        log_iov_write(log, ctx.mem, &pending.iov, n as usize);
    }
    let mut left = n;
    for c in pending.chains.iter().take(count) {
        let len = c.capacity.min(left);
        ring.push_used(ctx.mem, c.head, len as u32);
        left -= len;
    }
    // Published frame by frame, unlike TX: the driver can take each frame
    // while the next is read, instead of waiting for the whole batch.
    ring.publish_used(ctx.mem);
    pending.consume(count);
}

#[cfg(test)]
mod tests {
    use super::super::testing::{frame, Buffer, DriverRing, FakeTap, GuestRam};
    use super::*;
    use crate::tap::TapQueues;
    use std::sync::Arc;

    struct Rig {
        ram: GuestRam,
        driver: DriverRing,
        ring: Vring,
        pending: RxPending,
        tap: Arc<FakeTap>,
        filter: NativeFilter,
        mergeable: bool,
    }

    fn rig(num: u16, mergeable: bool) -> Rig {
        let ram = GuestRam::new();
        let driver = DriverRing::new(&ram, num);
        let ring = Vring::start(0, &driver.setup(), &ram.memory, false, None).unwrap();
        Rig {
            ram,
            driver,
            ring,
            pending: RxPending::default(),
            tap: FakeTap::new(1),
            filter: NativeFilter::default(),
            mergeable,
        }
    }

    impl Rig {
        /// Offers one device-writable buffer of `len` bytes; its address.
        fn give(&mut self, len: u32) -> u64 {
            let addr = self.ram.alloc(u64::from(len));
            self.driver.offer(
                &self.ram,
                &[Buffer {
                    addr,
                    len,
                    device_writes: true,
                }],
            );
            addr
        }

        fn receive(&mut self, budget: usize) -> (Batch, RxOutcome) {
            let ctx = RxContext {
                mem: self.ram.memory.mmap(),
                tap: self.tap.queue(0).unwrap(),
                hdr_len: 12,
                mergeable: self.mergeable,
                frame_room: MAX_FRAME,
                filter: &self.filter,
                link_up: true,
                dirty_log: None,
            };
            process_rx(
                &mut self.ring,
                &mut self.pending,
                &ctx,
                budget,
                &mut Allowance::unlimited(),
            )
        }
    }

    /// `frame` as the guest finds it: num_buffers (bytes 10..12) set.
    fn with_num_buffers(mut frame: Vec<u8>, n: u16) -> Vec<u8> {
        frame[10..12].copy_from_slice(&n.to_le_bytes());
        frame
    }

    #[test]
    fn a_frame_lands_whole_in_the_guest_buffer() {
        let mut r = rig(16, false);
        let at = r.give(2048);
        let sent = frame(1000, 7);
        r.tap.inject(0, &sent);
        let (batch, outcome) = r.receive(16);
        assert_eq!((batch.packets, batch.bytes), (1, 1000));
        assert_eq!(outcome, RxOutcome::NeedBuffers, "its one buffer used");
        assert_eq!(r.driver.take_used(&r.ram), vec![(0, 1012)]);
        assert_eq!(r.ram.read(at, 1012), with_num_buffers(sent, 1));
    }

    #[test]
    fn mergeable_frames_span_buffers_and_say_how_many() {
        let mut r = rig(16, true);
        // Room for the largest frame before any read (MAX_FRAME).
        let buffers: Vec<u64> = (0..10).map(|_| r.give(1024)).collect();
        let sent = frame(3000, 9);
        r.tap.inject(0, &sent);
        let (batch, _) = r.receive(16);
        assert_eq!(batch.packets, 1);
        assert_eq!(
            r.driver.take_used(&r.ram),
            vec![(0, 1024), (1, 1024), (2, 3012 - 2048)]
        );
        let landed: Vec<u8> = [
            r.ram.read(buffers[0], 1024),
            r.ram.read(buffers[1], 1024),
            r.ram.read(buffers[2], 3012 - 2048),
        ]
        .concat();
        assert_eq!(landed, with_num_buffers(sent, 3));
        assert_eq!(r.pending.len(), 7, "taken ahead for the next frame");
        let before = r.ring.queue.next_avail();
        r.pending.rewind(&mut r.ring);
        assert_eq!(r.ring.queue.next_avail(), before - 7, "given back");
    }

    #[test]
    fn a_frame_larger_than_the_buffer_is_dropped_and_the_buffer_kept() {
        let mut r = rig(16, false);
        r.give(200);
        r.tap.inject(0, &frame(500, 1));
        r.tap.inject(0, &frame(100, 2));
        let (batch, _) = r.receive(16);
        assert_eq!((batch.drops, batch.packets), (1, 1));
        assert_eq!(
            r.driver.take_used(&r.ram),
            vec![(0, 112)],
            "no partial frame"
        );
    }

    #[test]
    fn without_buffers_the_frame_waits_in_the_tap() {
        let mut r = rig(16, false);
        r.tap.inject(0, &frame(100, 1));
        let (batch, outcome) = r.receive(16);
        assert_eq!((batch.packets, outcome), (0, RxOutcome::NeedBuffers));
        r.give(2048);
        let (batch, _) = r.receive(16);
        assert_eq!(batch.packets, 1, "the frame was not lost");
    }

    #[test]
    fn a_bad_chain_goes_back_unused_and_the_next_one_serves() {
        let mut r = rig(16, false);
        let addr = r.ram.alloc(2048);
        r.driver.offer(
            &r.ram,
            &[Buffer {
                addr,
                len: 2048,
                device_writes: false,
            }],
        );
        r.give(2048);
        r.tap.inject(0, &frame(100, 1));
        let (batch, _) = r.receive(16);
        assert_eq!((batch.bad_chains, batch.packets), (1, 1));
        assert_eq!(r.driver.take_used(&r.ram), vec![(0, 0), (1, 112)]);
    }

    #[test]
    fn the_filter_decides_before_the_guest_sees_a_frame() {
        let mut r = rig(16, false);
        r.filter = NativeFilter::from(&sandnic_device::RxFilter {
            mac: [0x52, 0x54, 0, 0, 0, 1],
            ..Default::default()
        });
        r.give(2048);
        let mut other = frame(100, 0);
        other[12..18].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
        let mut ours = frame(100, 0);
        ours[12..18].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        r.tap.inject(0, &other);
        r.tap.inject(0, &ours);
        let (batch, _) = r.receive(16);
        assert_eq!((batch.filtered, batch.packets), (1, 1));
        let used = r.driver.take_used(&r.ram);
        assert_eq!(used, vec![(0, 112)]);
    }
}
