//! The driver side of a split virtqueue (virtio 1.2 §2.7), enough to drive a
//! virtio-net device from a test: add chains, kick when the device wants it,
//! reap used entries. `add_raw` writes arbitrary descriptors for the
//! bad-input tests.

use super::guest_ram::GuestRam;
use std::sync::atomic::Ordering;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// One buffer of a chain.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
    pub writable: bool,
}

/// A descriptor exactly as written to the table.
#[derive(Debug, Clone, Copy)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

pub struct Virtq {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    free: Vec<u16>,
    chain_len: Vec<u16>,
    avail_idx: u16,
    last_used: u16,
    /// Avail index at the last kick (for EVENT_IDX kick suppression).
    kicked_at: u16,
    pub event_idx: bool,
}

impl Virtq {
    pub fn new(ram: &GuestRam, size: u16) -> Self {
        let n = u64::from(size);
        let desc = ram.alloc(16 * n, 4096);
        let avail = ram.alloc(6 + 2 * n, 4096);
        let used = ram.alloc(6 + 8 * n, 4096);
        Self {
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            chain_len: vec![0; usize::from(size)],
            avail_idx: 0,
            last_used: 0,
            kicked_at: 0,
            event_idx: false,
        }
    }

    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// The descriptor index the next `add` will use as its head.
    pub fn next_free(&self) -> Option<u16> {
        self.free.last().copied()
    }

    fn write_desc(&self, mem: &GuestMemoryMmap, index: u16, d: RawDesc) {
        let at = self.desc.0 + 16 * u64::from(index);
        mem.write_obj(d.addr, GuestAddress(at)).unwrap();
        mem.write_obj(d.len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(d.flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(d.next, GuestAddress(at + 14)).unwrap();
    }

    fn read_next(&self, mem: &GuestMemoryMmap, index: u16) -> (u16, u16) {
        let at = self.desc.0 + 16 * u64::from(index);
        let flags: u16 = mem.read_obj(GuestAddress(at + 12)).unwrap();
        let next: u16 = mem.read_obj(GuestAddress(at + 14)).unwrap();
        (flags, next)
    }

    /// Adds a chain; None if the ring has too few free descriptors.
    pub fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || self.free.len() < bufs.len() {
            return None;
        }
        let ids: Vec<u16> = (0..bufs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags = if b.writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let next = if last { 0 } else { ids[i + 1] };
            self.write_desc(mem, ids[i], RawDesc { addr: b.addr.0, len: b.len, flags, next });
        }
        self.chain_len[usize::from(ids[0])] = bufs.len() as u16;
        self.publish(mem, ids[0]);
        Some(ids[0])
    }

    /// Writes `descs` at descriptor indices `first..` verbatim and publishes
    /// `head`. The descriptors are taken out of the free list for good: the
    /// device may treat them in any way.
    pub fn add_raw(&mut self, mem: &GuestMemoryMmap, descs: &[RawDesc], indices: &[u16], head: u16) {
        for (d, &i) in descs.iter().zip(indices) {
            self.free.retain(|&f| f != i);
            self.write_desc(mem, i, *d);
        }
        self.chain_len[usize::from(head)] = 0;
        self.publish(mem, head);
    }

    /// Takes free descriptor indices out of the free list (for `add_raw`).
    pub fn take_free(&mut self, n: usize) -> Vec<u16> {
        (0..n).map(|_| self.free.pop().expect("free descriptor")).collect()
    }

    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail.0 + 4 + 2 * slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.store(self.avail_idx, GuestAddress(self.avail.0 + 2), Ordering::Release).unwrap();
    }

    /// Whether the device asked to be kicked for what was added since the
    /// last kick (EVENT_IDX's avail_event, or the NO_NOTIFY flag).
    pub fn needs_kick(&mut self, mem: &GuestMemoryMmap) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        let old = self.kicked_at;
        let new = self.avail_idx;
        self.kicked_at = new;
        if self.event_idx {
            let event: u16 = mem
                .load(GuestAddress(self.used.0 + 4 + 8 * u64::from(self.size)), Ordering::Acquire)
                .unwrap();
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags: u16 = mem.load(self.used, Ordering::Acquire).unwrap();
            flags & 1 == 0
        }
    }

    /// Tells the device which used index should trigger the next interrupt
    /// (EVENT_IDX): the next one, i.e. always interrupt.
    pub fn want_interrupts(&self, mem: &GuestMemoryMmap) {
        if self.event_idx {
            mem.store(self.last_used, GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.size)), Ordering::Release)
                .unwrap();
        }
    }

    /// The next used entry `(head, len)`; its descriptors become free.
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32)> {
        let used_idx: u16 = mem.load(GuestAddress(self.used.0 + 2), Ordering::Acquire).unwrap();
        if used_idx == self.last_used {
            return None;
        }
        let slot = u64::from(self.last_used % self.size);
        let at = self.used.0 + 4 + 8 * slot;
        let head: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.last_used = self.last_used.wrapping_add(1);
        self.want_interrupts(mem);
        let head = head as u16;
        self.release(mem, head);
        Some((head, len))
    }

    fn release(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let mut index = head;
        for _ in 0..self.chain_len[usize::from(head)] {
            self.free.push(index);
            let (flags, next) = self.read_next(mem, index);
            if flags & F_NEXT == 0 {
                break;
            }
            index = next;
        }
        self.chain_len[usize::from(head)] = 0;
    }
}
