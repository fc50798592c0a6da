//! The driver side of a split virtqueue (virtio 1.2 §2.7), enough to drive a
//! virtio-net device from a test: add chains, kick when the device wants it,
//! reap used entries. `add_raw` writes arbitrary descriptors for the
//! bad-input tests.
//!
//! Like a real driver it touches the rings through plain pointers into the
//! shared RAM: the benches push millions of chains through it and the test
//! frontend must not be the bottleneck it measures.

use super::guest_ram::GuestRam;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use vm_memory::GuestAddress;

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
#[repr(C)]
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
    desc_ptr: *mut RawDesc,
    avail_ptr: *mut u8,
    used_ptr: *mut u8,
    free: Vec<u16>,
    chain_len: Vec<u16>,
    avail_idx: u16,
    last_used: u16,
    /// Avail index at the last kick (for EVENT_IDX kick suppression).
    kicked_at: u16,
    pub event_idx: bool,
    /// The driver polls this queue's used ring (see `quiet`).
    pub polled: bool,
}

// SAFETY: the raw pointers point into the shared RAM mapping, which the
// owning `TestNic` keeps alive alongside the queue; nothing is thread-local.
unsafe impl Send for Virtq {}

impl Virtq {
    /// A queue whose rings live in `ram`. `ram` must outlive the queue (the
    /// `TestNic` owns both).
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
            desc_ptr: ram.ptr(desc, 16 * n).cast(),
            avail_ptr: ram.ptr(avail, 6 + 2 * n),
            used_ptr: ram.ptr(used, 6 + 8 * n),
            free: (0..size).rev().collect(),
            chain_len: vec![0; usize::from(size)],
            avail_idx: 0,
            last_used: 0,
            kicked_at: 0,
            event_idx: false,
            polled: false,
        }
    }

    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// The descriptor index the next `add` will use as its head.
    pub fn next_free(&self) -> Option<u16> {
        self.free.last().copied()
    }

    fn u16_at(&self, base: *mut u8, offset: u64) -> &AtomicU16 {
        // SAFETY: every caller passes an offset inside its ring (checked
        // against the ring size when the ring was allocated), 2-aligned; the
        // mapping outlives `self`.
        unsafe { &*(base.add(offset as usize).cast::<AtomicU16>()) }
    }

    fn write_desc(&self, index: u16, d: RawDesc) {
        assert!(index < self.size);
        // SAFETY: `index` is inside the table (checked); the table is
        // 16-aligned and lives in the shared RAM.
        unsafe { self.desc_ptr.add(usize::from(index)).write_volatile(d) }
    }

    fn read_desc(&self, index: u16) -> RawDesc {
        // SAFETY: as in `write_desc` (indices come from our own chains).
        unsafe {
            self.desc_ptr
                .add(usize::from(index % self.size))
                .read_volatile()
        }
    }

    /// Adds a chain; None if the ring has too few free descriptors.
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        const MAX_BUFS: usize = 8;
        assert!(
            bufs.len() <= MAX_BUFS,
            "chains of at most {MAX_BUFS} buffers"
        );
        if bufs.is_empty() || self.free.len() < bufs.len() {
            return None;
        }
        // No allocation per chain: the benches add millions of them.
        let mut ids = [0u16; MAX_BUFS];
        for id in ids.iter_mut().take(bufs.len()) {
            *id = self.free.pop().unwrap();
        }
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags = if b.writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let next = if last { 0 } else { ids[i + 1] };
            self.write_desc(
                ids[i],
                RawDesc {
                    addr: b.addr.0,
                    len: b.len,
                    flags,
                    next,
                },
            );
        }
        self.chain_len[usize::from(ids[0])] = bufs.len() as u16;
        self.publish(ids[0]);
        Some(ids[0])
    }

    /// Writes `descs` into descriptor `slots` verbatim and publishes `head`.
    /// The slots were taken with `take_free` and are never given back: the
    /// device may treat them in any way.
    pub fn add_raw(&mut self, descs: &[RawDesc], slots: &[u16], head: u16) {
        for (d, &i) in descs.iter().zip(slots) {
            self.free.retain(|&f| f != i);
            self.write_desc(i, *d);
        }
        self.chain_len[usize::from(head % self.size)] = 0;
        self.publish(head);
    }

    /// Takes free descriptor indices out of the free list (for `add_raw`).
    pub fn take_free(&mut self, n: usize) -> Vec<u16> {
        (0..n)
            .map(|_| self.free.pop().expect("free descriptor"))
            .collect()
    }

    /// Writes `idx` into the available ring's index as a broken or hostile
    /// driver might (bad-input tests).
    pub fn corrupt_avail_idx(&mut self, idx: u16) {
        self.u16_at(self.avail_ptr, 2).store(idx, Ordering::Release);
    }

    fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.u16_at(self.avail_ptr, 4 + 2 * slot)
            .store(head, Ordering::Relaxed);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.u16_at(self.avail_ptr, 2)
            .store(self.avail_idx, Ordering::Release);
    }

    /// Whether the device asked to be kicked for what was added since the
    /// last kick (EVENT_IDX's avail_event, or the NO_NOTIFY flag).
    pub fn needs_kick(&mut self) -> bool {
        fence(Ordering::SeqCst);
        let old = self.kicked_at;
        let new = self.avail_idx;
        self.kicked_at = new;
        if self.event_idx {
            let event = self
                .u16_at(self.used_ptr, 4 + 8 * u64::from(self.size))
                .load(Ordering::Acquire);
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.u16_at(self.used_ptr, 0).load(Ordering::Acquire) & 1 == 0
        }
    }

    /// Tells the device which used index should trigger the next interrupt
    /// (EVENT_IDX): the next one, i.e. always interrupt.
    pub fn want_interrupts(&self) {
        if self.event_idx {
            self.u16_at(self.avail_ptr, 4 + 2 * u64::from(self.size))
                .store(self.last_used, Ordering::Release);
        }
    }

    /// Polling instead of interrupts (EVENT_IDX): moves `used_event` far
    /// ahead so the device does not signal for every batch, as a driver in
    /// busy-poll mode would.
    pub fn quiet(&self) {
        if self.event_idx {
            let far = self.last_used.wrapping_add(0x7fff);
            self.u16_at(self.avail_ptr, 4 + 2 * u64::from(self.size))
                .store(far, Ordering::Release);
        }
    }

    /// The next used entry `(head, len)`; its descriptors become free.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let used_idx = self.u16_at(self.used_ptr, 2).load(Ordering::Acquire);
        if used_idx == self.last_used {
            return None;
        }
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: the element is inside the used ring (slot < size).
        let (head, len) = unsafe {
            let elem = self.used_ptr.add(4 + 8 * slot).cast::<[u32; 2]>();
            let e = elem.read_volatile();
            (e[0], e[1])
        };
        self.last_used = self.last_used.wrapping_add(1);
        if !self.polled {
            self.want_interrupts();
        }
        let head = (head % u32::from(self.size)) as u16;
        self.release(head);
        Some((head, len))
    }

    fn release(&mut self, head: u16) {
        let mut index = head;
        for _ in 0..self.chain_len[usize::from(head)] {
            self.free.push(index);
            let d = self.read_desc(index);
            if d.flags & F_NEXT == 0 {
                break;
            }
            index = d.next;
        }
        self.chain_len[usize::from(head)] = 0;
    }
}
