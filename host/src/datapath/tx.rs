//! Transmit: guest → TAP. Each chain (virtio-net header + frame) goes to the
//! TAP with one system call (`tap_io::writev`); the TAP was told the header
//! length, so the header passes through untouched. A small chain is copied
//! out of guest memory first and goes in one piece (see `SMALL_CHAIN`); a
//! larger one goes straight from guest memory.

use super::rate_limit::Allowance;
use super::stats::Batch;
use super::tap_io;
use super::vring::{chain_iovecs, read_iov, Vring};
use crate::memory::guest_memory::IoVec;
use std::os::fd::BorrowedFd;
use virtio_queue::QueueOwnedT;
use vm_memory::GuestMemoryMmap;

/// Largest chain accepted: a 64 KiB GSO frame with its Ethernet and
/// virtio-net headers.
pub const MAX_TX_LEN: u64 = 65_550 + 12;

pub struct TxContext<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub tap: BorrowedFd<'a>,
    pub hdr_len: usize,
    /// With the link down frames are consumed and dropped, as on a NIC.
    pub link_up: bool,
}

/// Chains taken from the ring before they are sent: one pass over the
/// available ring per batch instead of one per chain.
const GATHER: usize = 64;

/// Chains up to this many bytes (virtio-net header included) are copied
/// out of guest memory, a whole group of them, before the group is sent.
///
/// The driver wrote those bytes on its own CPU a moment before, so the
/// first read of them is a cross-core cache miss. Left to the system call,
/// every frame's miss stalls the kernel's copy on its own, behind the
/// speculation barriers of the system-call entry. Copied here in one pass,
/// the misses of a group overlap, and the frame goes from this CPU's cache
/// in one piece, with `write` (see `tap_io::writev`). (DPDK's vhost copies
/// every frame out of the guest before its TAP PMD writes it, for the same
/// reason.) A larger chain goes straight from guest memory: the kernel's
/// copy of it streams many lines, and copying its first ones here as well
/// cost 10 % at 1500 bytes when the driver had not just written them, and
/// gained nothing when it had.
const SMALL_CHAIN: usize = 128;

/// The chain (of `len` bytes, 0 when malformed) is copied whole.
fn is_small(len: u64) -> bool {
    len > 0 && len <= SMALL_CHAIN as u64
}

/// One chain ready for the TAP.
enum Frame<'a> {
    /// A small chain, copied out of guest memory.
    Copied(&'a [u8]),
    /// A larger chain, in its guest buffers.
    InGuest(&'a [IoVec]),
}

/// Sends up to `budget` chains, while `allowance` (the rate limit's)
/// lasts. Returns the counts and whether the ring may hold more (budget or
/// allowance spent). Chains the allowance does not cover stay in the ring,
/// untouched: the guest's queue fills and its stack slows down, and
/// nothing is dropped for the limit.
pub fn process_tx(
    ring: &mut Vring,
    ctx: &TxContext<'_>,
    iov: &mut Vec<IoVec>,
    budget: usize,
    allowance: &mut Allowance,
) -> (Batch, bool) {
    let mut batch = Batch::default();
    let mut done = 0;
    let mut throttled = false;
    // (head, first iovec, iovec count, frame length or 0 for a bad chain)
    let mut chains = [(0u16, 0usize, 0usize, 0u64); GATHER];
    let mut copies = [[0u8; SMALL_CHAIN]; GATHER];
    loop {
        ring.disable_notification(ctx.mem);
        while done < budget && !throttled {
            iov.clear();
            // No more chains than the allowance has frames: the rest would
            // only be walked and given back.
            let room = GATHER
                .min(budget - done)
                .min(usize::try_from(allowance.frames.max(1)).unwrap_or(GATHER));
            let gathered = gather(ring, ctx, iov, &mut chains[..room]);
            if gathered == 0 {
                break;
            }
            let group = &chains[..gathered];
            copy_small_chains(group, iov, &mut copies);
            let mut sent = 0;
            for (k, &(head, first, count, len)) in group.iter().enumerate() {
                if !allowance.allows_another() {
                    ring.untake((gathered - k) as u16);
                    throttled = true;
                    break;
                }
                if len > ctx.hdr_len as u64 {
                    let frame = if is_small(len) {
                        Frame::Copied(&copies[k][..len as usize])
                    } else {
                        Frame::InGuest(&iov[first..first + count])
                    };
                    if send(ctx, &frame, len, &mut batch) {
                        allowance.charge(len - ctx.hdr_len as u64);
                    }
                } else {
                    batch.bad_chains += 1;
                }
                // A TX buffer is only read: the used length is 0.
                ring.push_used(ctx.mem, head, 0);
                sent += 1;
            }
            done += sent;
        }
        if done >= budget || throttled {
            break;
        }
        // Re-enable notifications, then look again: a chain added in
        // between would otherwise wait for the next kick.
        if !ring.enable_and_recheck(ctx.mem) {
            break;
        }
    }
    if done > 0 {
        ring.notify(ctx.mem);
    }
    (batch, done >= budget || throttled)
}

/// Takes up to `out.len()` chains off the ring, resolving their buffers into
/// `iov`. A malformed chain gets length 0.
fn gather(
    ring: &mut Vring,
    ctx: &TxContext<'_>,
    iov: &mut Vec<IoVec>,
    out: &mut [(u16, usize, usize, u64)],
) -> usize {
    let Ok(mut avail) = ring.queue.iter(ctx.mem) else {
        return 0;
    };
    let mut n = 0;
    while n < out.len() {
        let Some(chain) = avail.next() else { break };
        let head = chain.head_index();
        let first = iov.len();
        let len = chain_iovecs(chain, ctx.mem, false, MAX_TX_LEN, iov).unwrap_or(0);
        out[n] = (head, first, iov.len() - first, len);
        n += 1;
    }
    n
}

/// Copies every chain of `group` of at most `SMALL_CHAIN` bytes into
/// `copies` (a malformed chain, of length 0, is left alone).
fn copy_small_chains(
    group: &[(u16, usize, usize, u64)],
    iov: &[IoVec],
    copies: &mut [[u8; SMALL_CHAIN]; GATHER],
) {
    for (k, &(_, first, count, len)) in group.iter().enumerate() {
        if !is_small(len) {
            continue;
        }
        // SAFETY: the iovecs were translated against `ctx.mem` by
        // `chain_iovecs` during this pass, and that memory stays mapped
        // for it; the bytes are copied as they are, never trusted. They
        // hold `len` bytes, which fit in the copy.
        unsafe { read_iov(&iov[first..first + count], 0, &mut copies[k]) };
    }
}

/// Writes one chain of `len` bytes to the TAP; true if it went.
fn send(ctx: &TxContext<'_>, frame: &Frame<'_>, len: u64, batch: &mut Batch) -> bool {
    if !ctx.link_up {
        batch.drops += 1;
        return false;
    }
    let one;
    let entries = match frame {
        Frame::Copied(bytes) => {
            one = [libc::iovec {
                iov_base: bytes.as_ptr().cast_mut().cast(),
                iov_len: bytes.len(),
            }];
            &one[..]
        }
        Frame::InGuest(chain) => IoVec::as_raw(chain),
    };
    // SAFETY: a copied frame is alive for the call; every other entry
    // points into guest memory mapped by `ctx.mem` (checked by
    // `chain_iovecs`), which stays mapped for it. writev only reads.
    let written = unsafe { tap_io::writev(ctx.tap, entries) };
    if written < 0 {
        batch.drops += 1;
        false
    } else {
        batch.packets += 1;
        batch.bytes += len - ctx.hdr_len as u64;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{frame, Buffer, DriverRing, FakeTap, GuestRam};
    use super::*;
    use crate::tap::TapQueues;

    /// `bytes` in guest RAM as one device-readable buffer.
    fn readable(ram: &GuestRam, bytes: &[u8]) -> Buffer {
        let addr = ram.alloc(bytes.len() as u64);
        ram.write(addr, bytes);
        Buffer {
            addr,
            len: bytes.len() as u32,
            device_writes: false,
        }
    }

    struct Rig {
        ram: GuestRam,
        driver: DriverRing,
        ring: Vring,
        tap: Arc<FakeTap>,
    }

    use std::sync::Arc;

    fn rig() -> Rig {
        let ram = GuestRam::new();
        let driver = DriverRing::new(&ram, 16);
        let ring = Vring::start(1, &driver.setup(), &ram.memory, false, None).unwrap();
        Rig {
            ram,
            driver,
            ring,
            tap: FakeTap::new(1),
        }
    }

    impl Rig {
        fn send(&mut self, budget: usize, link_up: bool) -> (Batch, bool) {
            let ctx = TxContext {
                mem: self.ram.memory.mmap(),
                tap: self.tap.queue(0).unwrap(),
                hdr_len: 12,
                link_up,
            };
            process_tx(
                &mut self.ring,
                &ctx,
                &mut Vec::new(),
                budget,
                &mut Allowance::unlimited(),
            )
        }
    }

    #[test]
    fn every_chain_reaches_the_tap_whole_and_goes_back_used() {
        let mut r = rig();
        let small = frame(60, 1);
        let large = frame(1500, 2);
        let (first, second) = large.split_at(700);
        let a = r.driver.offer(&r.ram, &[readable(&r.ram, &small)]);
        let b = r
            .driver
            .offer(&r.ram, &[readable(&r.ram, first), readable(&r.ram, second)]);
        let (batch, more) = r.send(256, true);
        assert!(!more);
        assert_eq!((batch.packets, batch.bytes), (2, 60 + 1500));
        assert_eq!(r.tap.drain(0), vec![small, large]);
        assert_eq!(
            r.driver.take_used(&r.ram),
            vec![(u32::from(a), 0), (u32::from(b), 0)]
        );
    }

    #[test]
    fn a_chain_no_longer_than_the_header_is_returned_unsent() {
        let mut r = rig();
        let head = r.driver.offer(&r.ram, &[readable(&r.ram, &[0; 12])]);
        let (batch, _) = r.send(256, true);
        assert_eq!((batch.packets, batch.bad_chains), (0, 1));
        assert!(r.tap.drain(0).is_empty());
        assert_eq!(r.driver.take_used(&r.ram), vec![(u32::from(head), 0)]);
    }

    #[test]
    fn a_device_writable_buffer_makes_a_bad_chain() {
        let mut r = rig();
        let mut buffer = readable(&r.ram, &frame(100, 3));
        buffer.device_writes = true;
        r.driver.offer(&r.ram, &[buffer]);
        let (batch, _) = r.send(256, true);
        assert_eq!(batch.bad_chains, 1);
        assert!(r.tap.drain(0).is_empty());
    }

    #[test]
    fn with_the_link_down_frames_are_consumed_and_dropped() {
        let mut r = rig();
        r.driver.offer(&r.ram, &[readable(&r.ram, &frame(100, 4))]);
        let (batch, _) = r.send(256, false);
        assert_eq!((batch.packets, batch.drops), (0, 1));
        assert!(r.tap.drain(0).is_empty());
        assert_eq!(r.driver.take_used(&r.ram).len(), 1);
    }

    #[test]
    fn the_budget_bounds_a_pass_and_says_more_waits() {
        let mut r = rig();
        for seed in 0..5 {
            r.driver
                .offer(&r.ram, &[readable(&r.ram, &frame(64, seed))]);
        }
        let (batch, more) = r.send(2, true);
        assert_eq!((batch.packets, more), (2, true));
        let (batch, more) = r.send(256, true);
        assert_eq!((batch.packets, more), (3, false));
        let sent = r.tap.drain(0);
        assert_eq!(sent.len(), 5);
        assert!(
            sent.iter().zip(0..).all(|(f, seed)| *f == frame(64, seed)),
            "in order"
        );
    }
}
