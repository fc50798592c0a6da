//! Transmit: guest → TAP. Each chain (virtio-net header + frame) goes to the
//! TAP with one `writev` straight from guest memory; the TAP was told the
//! header length, so the header passes through untouched.

use super::stats::Batch;
use super::tap_io;
use super::vring::{chain_iovecs, Vring};
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
    loop {
        let _ = ring.queue.disable_notification(ctx.mem);
        while done < budget {
            iov.clear();
            let gathered = gather(ring, ctx, iov, &mut chains[..GATHER.min(budget - done)]);
            if gathered == 0 {
                break;
            }
            for &(head, first, count, len) in &chains[..gathered] {
                if len > ctx.hdr_len as u64 {
                    send(ctx, &iov[first..first + count], len, &mut batch);
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

fn send(ctx: &TxContext<'_>, iov: &[IoVec], len: u64, batch: &mut Batch) {
    if !ctx.link_up {
        batch.drops += 1;
        return;
    }
    // SAFETY: every iovec points into guest memory mapped by `ctx.mem`
    // (checked by `chain_iovecs`), which stays mapped for the call; writev
    // only reads from them.
    let written = unsafe { tap_io::writev(ctx.tap, iov) };
    if written < 0 {
        batch.drops += 1;
    } else {
        batch.packets += 1;
        batch.bytes += len - ctx.hdr_len as u64;
    }
}
