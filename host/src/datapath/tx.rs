//! Transmit: guest → TAP. Each chain (virtio-net header + frame) goes to the
//! TAP with one system call (`tap_io::writev`); the TAP was told the header
//! length, so the header passes through untouched. The first bytes of each
//! frame are copied out of guest memory first (see `HEAD_COPY`); the rest
//! goes straight from guest memory.

use super::stats::Batch;
use super::tap_io;
use super::vring::{chain_iovecs, read_iov, Vring, MAX_SEGMENTS};
use crate::memory::guest_memory::IoVec;
use std::os::fd::BorrowedFd;
use virtio_queue::{QueueOwnedT, QueueT};
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

/// Bytes at the start of each chain copied out of guest memory, for a whole
/// group of chains, before the group is sent: the virtio-net header and
/// all of a small frame.
///
/// The driver wrote those bytes on its own CPU a moment before, so the
/// first read of them is a cross-core cache miss. Left to `writev`, every
/// frame's miss stalls the kernel's copy of the header on its own, behind
/// the speculation barriers of the system-call entry. Copied here in one
/// pass, the misses of a group overlap, and the kernel reads the head from
/// this CPU's cache. (DPDK's vhost copies every frame out of the guest
/// before its TAP PMD writes it, for the same reason.)
const HEAD_COPY: usize = 128;

/// One chain ready for the TAP: its first bytes copied, then the rest of
/// its guest buffers.
struct Frame<'a> {
    head: &'a [u8],
    chain: &'a [IoVec],
    /// The whole chain's length.
    len: u64,
}

/// Sends up to `budget` chains. Returns the counts and whether the ring may
/// hold more (budget exhausted).
pub fn process_tx(
    ring: &mut Vring,
    ctx: &TxContext<'_>,
    iov: &mut Vec<IoVec>,
    budget: usize,
) -> (Batch, bool) {
    let mut batch = Batch::default();
    let mut done = 0;
    // (head, first iovec, iovec count, frame length or 0 for a bad chain)
    let mut chains = [(0u16, 0usize, 0usize, 0u64); GATHER];
    let mut heads = [[0u8; HEAD_COPY]; GATHER];
    let mut raw = Vec::with_capacity(MAX_SEGMENTS + 1);
    loop {
        let _ = ring.queue.disable_notification(ctx.mem);
        while done < budget {
            iov.clear();
            let gathered = gather(ring, ctx, iov, &mut chains[..GATHER.min(budget - done)]);
            if gathered == 0 {
                break;
            }
            let group = &chains[..gathered];
            let copied = copy_heads(group, iov, &mut heads);
            for (k, &(head, first, count, len)) in group.iter().enumerate() {
                if len > ctx.hdr_len as u64 {
                    let frame = Frame {
                        head: &heads[k][..copied[k]],
                        chain: &iov[first..first + count],
                        len,
                    };
                    send(ctx, &frame, &mut raw, &mut batch);
                } else {
                    batch.bad_chains += 1;
                }
                // A TX buffer is only read: the used length is 0.
                ring.push_used(ctx.mem, head, 0);
            }
            done += gathered;
        }
        if done >= budget {
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
    (batch, done >= budget)
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

/// Copies the first `HEAD_COPY` bytes of every chain of `group` into
/// `heads`; returns how many bytes each got (0 for a malformed chain).
fn copy_heads(
    group: &[(u16, usize, usize, u64)],
    iov: &[IoVec],
    heads: &mut [[u8; HEAD_COPY]; GATHER],
) -> [usize; GATHER] {
    let mut copied = [0; GATHER];
    for (k, &(_, first, count, _)) in group.iter().enumerate() {
        // SAFETY: the iovecs were translated against `ctx.mem` by
        // `chain_iovecs` during this pass, and that memory stays mapped
        // for it; the bytes are copied as they are, never trusted.
        copied[k] = unsafe { read_iov(&iov[first..first + count], 0, &mut heads[k]) };
    }
    copied
}

fn send(ctx: &TxContext<'_>, frame: &Frame<'_>, raw: &mut Vec<libc::iovec>, batch: &mut Batch) {
    if !ctx.link_up {
        batch.drops += 1;
        return;
    }
    raw.clear();
    raw.push(libc::iovec {
        iov_base: frame.head.as_ptr().cast_mut().cast(),
        iov_len: frame.head.len(),
    });
    let mut skip = frame.head.len();
    for buffer in frame.chain {
        if skip < buffer.len() {
            raw.push(buffer.skip(skip).raw());
        }
        skip = skip.saturating_sub(buffer.len());
    }
    // One entry more than the chain has can pass writev's limit; such a
    // chain (of a thousand tiny buffers) goes as it is.
    let entries = if raw.len() <= MAX_SEGMENTS {
        &raw[..]
    } else {
        IoVec::as_raw(frame.chain)
    };
    // SAFETY: `frame.head` is alive for the call; every other entry points
    // into guest memory mapped by `ctx.mem` (checked by `chain_iovecs`),
    // which stays mapped for it. writev only reads.
    let written = unsafe { tap_io::writev(ctx.tap, entries) };
    if written < 0 {
        batch.drops += 1;
    } else {
        batch.packets += 1;
        batch.bytes += frame.len - ctx.hdr_len as u64;
    }
}
