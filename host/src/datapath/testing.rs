//! What the datapath's unit tests run on instead of a guest and a TAP: guest
//! RAM in a memfd, a driver's side of a split ring laid out in it by hand
//! (as Linux's virtio_ring does), and a TAP whose queues are datagram
//! socketpairs. None of it needs root, so the hot path's rules (which
//! chains are used, with what length, when the driver is notified) are
//! checked on every `cargo test`, not only through UML and QEMU guests.

use super::vring::{RingAddrs, VringSetup};
use crate::memory::guest_memory::{GuestMemory, RegionInfo};
use crate::tap::{TapError, TapQueues};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// Where guest RAM starts, in guest-physical and frontend-virtual
/// addresses alike (the test frontend maps it 1:1).
pub const RAM_BASE: u64 = 0x10_0000;
const RAM_SIZE: u64 = 4 << 20;

/// Guest RAM with a bump allocator for rings and buffers.
pub struct GuestRam {
    pub memory: Arc<GuestMemory>,
    next: Mutex<u64>,
}

impl GuestRam {
    pub fn new() -> Self {
        let fd = nix::sys::memfd::memfd_create(
            c"sandnic-test-ram",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .expect("memfd");
        nix::unistd::ftruncate(&fd, RAM_SIZE as i64).expect("ftruncate");
        let region = RegionInfo {
            guest_phys_addr: RAM_BASE,
            memory_size: RAM_SIZE,
            userspace_addr: RAM_BASE,
            mmap_offset: 0,
        };
        let memory = GuestMemory::map(vec![region], vec![fd]).expect("map guest RAM");
        Self {
            memory: Arc::new(memory),
            next: Mutex::new(RAM_BASE),
        }
    }

    /// `len` bytes of fresh RAM, 64-byte aligned.
    pub fn alloc(&self, len: u64) -> u64 {
        let mut next = self.next.lock().unwrap();
        let at = next.next_multiple_of(64);
        *next = at + len;
        assert!(*next <= RAM_BASE + RAM_SIZE, "test RAM exhausted");
        at
    }

    pub fn write(&self, at: u64, bytes: &[u8]) {
        self.memory
            .mmap()
            .write_slice(bytes, GuestAddress(at))
            .expect("write guest RAM");
    }

    pub fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        self.memory
            .mmap()
            .read_slice(&mut bytes, GuestAddress(at))
            .expect("read guest RAM");
        bytes
    }

    fn u16_at(&self, at: u64) -> u16 {
        let b = self.read(at, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    fn set_u16(&self, at: u64, value: u16) {
        self.write(at, &value.to_le_bytes());
    }
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// One buffer of a chain: its guest address and length, and whether the
/// device writes it (RX) or reads it (TX).
#[derive(Debug, Clone, Copy)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub device_writes: bool,
}

/// The driver's side of a split ring: it offers chains, reads what the
/// device used, and sets `used_event`.
pub struct DriverRing {
    pub num: u16,
    pub addrs: RingAddrs,
    /// Where the device starts taking chains (`setup().base`).
    base: u16,
    /// The next free descriptor (chains take descriptors in turn).
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    pub kick: Arc<OwnedFd>,
    pub call: Arc<OwnedFd>,
}

impl DriverRing {
    /// A zeroed ring of `num` entries in `ram`, with fresh kick and call
    /// eventfds.
    pub fn new(ram: &GuestRam, num: u16) -> Self {
        let n = u64::from(num);
        let desc = ram.alloc(16 * n);
        let avail = ram.alloc(6 + 2 * n);
        let used = ram.alloc(6 + 8 * n);
        ram.write(desc, &vec![0; (16 * n) as usize]);
        ram.write(avail, &vec![0; (6 + 2 * n) as usize]);
        ram.write(used, &vec![0; (6 + 8 * n) as usize]);
        let eventfd = || {
            let fd =
                EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                    .expect("eventfd");
            Arc::new(OwnedFd::from(fd))
        };
        Self {
            num,
            addrs: RingAddrs { desc, avail, used },
            base: 0,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            kick: eventfd(),
            call: eventfd(),
        }
    }

    /// Both indices at `idx`, as a ring that ran that far (the device is
    /// told with `setup().base`).
    pub fn start_at(&mut self, ram: &GuestRam, idx: u16) {
        self.base = idx;
        self.avail_idx = idx;
        self.used_seen = idx;
        ram.set_u16(self.addrs.avail + 2, idx);
        ram.set_u16(self.addrs.used + 2, idx);
    }

    /// What the frontend tells the backend about this ring.
    pub fn setup(&self) -> VringSetup {
        VringSetup {
            num: self.num,
            addrs: Some(self.addrs),
            base: self.base,
            enabled: true,
            started: true,
            kick: Some(self.kick.clone()),
            call: Some(self.call.clone()),
            ..VringSetup::default()
        }
    }

    /// Offers one chain of `buffers` and publishes it; its head.
    pub fn offer(&mut self, ram: &GuestRam, buffers: &[Buffer]) -> u16 {
        let head = self.next_desc;
        for (i, b) in buffers.iter().enumerate() {
            let index = (self.next_desc + i as u16) % self.num;
            let last = i + 1 == buffers.len();
            let flags = if b.device_writes { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&b.addr.to_le_bytes());
            d[8..12].copy_from_slice(&b.len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&((index + 1) % self.num).to_le_bytes());
            ram.write(self.addrs.desc + 16 * u64::from(index), &d);
        }
        self.next_desc = (self.next_desc + buffers.len() as u16) % self.num;
        let slot = self.avail_idx % self.num;
        ram.set_u16(self.addrs.avail + 4 + 2 * u64::from(slot), head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        ram.set_u16(self.addrs.avail + 2, self.avail_idx);
        head
    }

    /// The used index the device published.
    pub fn used_idx(&self, ram: &GuestRam) -> u16 {
        ram.u16_at(self.addrs.used + 2)
    }

    /// The entries (head, length) the device published since the last call.
    pub fn take_used(&mut self, ram: &GuestRam) -> Vec<(u32, u32)> {
        let idx = self.used_idx(ram);
        let mut entries = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.num);
            let e = ram.read(self.addrs.used + 4 + 8 * slot, 8);
            entries.push((
                u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            ));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        entries
    }

    /// EVENT_IDX: the driver wants a notification once the used index
    /// passes `idx`.
    pub fn set_used_event(&self, ram: &GuestRam, idx: u16) {
        ram.set_u16(self.addrs.avail + 4 + 2 * u64::from(self.num), idx);
    }

    /// Kicks the device.
    pub fn kick(&self) {
        super::notify::signal(self.kick.as_fd());
    }

    /// Notifications the device sent since the last call (an eventfd
    /// counts them).
    pub fn notifications(&self) -> u64 {
        let mut count = [0u8; 8];
        match nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&*self.call), &mut count) {
            Ok(8) => u64::from_ne_bytes(count),
            _ => 0,
        }
    }
}

/// A TAP whose queues are datagram socketpairs: the datapath holds one
/// end (a read takes one whole frame, as from a TAP queue), the test the
/// other. Attaching and detaching is recorded.
pub struct FakeTap {
    queues: Vec<UnixDatagram>,
    peers: Vec<UnixDatagram>,
    attached: Mutex<Vec<bool>>,
}

impl FakeTap {
    pub fn new(queues: usize) -> Arc<Self> {
        let (ours, peers): (Vec<_>, Vec<_>) = (0..queues)
            .map(|_| {
                let (ours, peer) = UnixDatagram::pair().expect("socketpair");
                ours.set_nonblocking(true).expect("nonblocking");
                (ours, peer)
            })
            .unzip();
        Arc::new(Self {
            queues: ours,
            peers,
            attached: Mutex::new(vec![true; queues]),
        })
    }

    /// Sends `frame` (virtio-net header first) to queue `q`, as the kernel
    /// would.
    pub fn inject(&self, q: usize, frame: &[u8]) {
        self.peers[q].send(frame).expect("inject a frame");
    }

    /// The next frame the datapath wrote to queue `q`, waiting up to a
    /// second for it.
    pub fn written(&self, q: usize) -> Option<Vec<u8>> {
        let peer = &self.peers[q];
        peer.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        let mut frame = vec![0u8; 70_000];
        let n = peer.recv(&mut frame).ok()?;
        frame.truncate(n);
        Some(frame)
    }

    /// Whatever the datapath wrote to queue `q` by now.
    pub fn drain(&self, q: usize) -> Vec<Vec<u8>> {
        let peer = &self.peers[q];
        peer.set_nonblocking(true).expect("nonblocking");
        let mut frames = Vec::new();
        let mut frame = vec![0u8; 70_000];
        while let Ok(n) = peer.recv(&mut frame) {
            frames.push(frame[..n].to_vec());
        }
        peer.set_nonblocking(false).expect("blocking");
        frames
    }

    pub fn attached(&self, q: usize) -> bool {
        self.attached.lock().unwrap()[q]
    }
}

impl TapQueues for FakeTap {
    fn queue_count(&self) -> usize {
        self.queues.len()
    }

    fn queue(&self, index: usize) -> Option<BorrowedFd<'_>> {
        self.queues.get(index).map(|q| q.as_fd())
    }

    fn set_queue_attached(&self, index: usize, attached: bool) -> Result<(), TapError> {
        self.attached.lock().unwrap()[index] = attached;
        Ok(())
    }
}

/// Waits up to two seconds for `done`, checking every millisecond.
pub fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    done()
}

/// A frame of `len` bytes after a zeroed 12-byte virtio-net header, its
/// payload numbered by `seed` so that frames can be told apart.
pub fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend((0..len).map(|i| seed.wrapping_add(i as u8)));
    f
}
