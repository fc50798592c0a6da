//! One virtqueue: what the frontend configured (`VringSetup`, protocol
//! state that survives stops and handovers) and the started ring (`Vring`,
//! a `virtio_queue::Queue` over guest memory).
//!
//! Descriptor chains come from the guest and are walked defensively here:
//! every buffer must lie in guest memory and go in the expected direction,
//! the total length and segment count are bounded, and a chain the walker
//! had to cut short (a loop, an index past the table) is rejected.

use super::notify;
use crate::memory::dirty_log::DirtyLog;
use crate::memory::guest_memory::{host_to_gpa, translate, GuestMemory, IoVec};
use std::num::Wrapping;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Split-ring layout (virtio 1.2 §2.7): flags and idx before the entries.
const AVAIL_RING_HEADER: u64 = 4;
const USED_RING_HEADER: u64 = 4;
/// Where the used ring's `idx` field sits (after `flags`).
const USED_IDX_OFFSET: u64 = 2;
const USED_ELEMENT_SIZE: u64 = 8;

/// Largest queue a split ring may have.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Segments per chain accepted (Linux's UIO_MAXIOV): a chain is one readv or
/// writev.
pub const MAX_SEGMENTS: usize = 1024;

/// A ring size the split ring allows: a power of two, at most 32768.
pub fn valid_size(num: u16) -> bool {
    num != 0 && num.is_power_of_two() && num <= MAX_QUEUE_SIZE
}

/// Ring addresses as the frontend sent them (its virtual addresses).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl RingAddrs {
    /// The three parts of a ring of `num` entries, each with where it
    /// starts and how many bytes it spans: the descriptor table (16 bytes
    /// an entry), the available ring (flags, idx, 2 bytes an entry,
    /// used_event) and the used ring (flags, idx, 8 bytes an entry,
    /// avail_event).
    pub fn parts(&self, num: u16) -> [(&'static str, u64, u64); 3] {
        let n = u64::from(num);
        [
            ("descriptor", self.desc, 16 * n),
            ("available", self.avail, AVAIL_RING_HEADER + 2 * n + 2),
            (
                "used",
                self.used,
                USED_RING_HEADER + USED_ELEMENT_SIZE * n + 2,
            ),
        ]
    }

    /// The used ring's index as the guest's memory holds it: how many
    /// chains the device has completed, all published. None if the ring
    /// lies outside `mem`.
    pub fn used_index(&self, mem: &GuestMemory) -> Option<u16> {
        let gpa = mem.va_to_gpa(self.used + 2, 2)?;
        mem.mmap().read_obj::<u16>(gpa).ok().map(u16::from_le)
    }
}

/// What the frontend configured for one virtqueue.
#[derive(Debug, Default)]
pub struct VringSetup {
    pub num: u16,
    pub addrs: Option<RingAddrs>,
    /// Where the used ring's writes go in the dirty log (SET_VRING_ADDR's
    /// `log_guest_addr`, when its VHOST_VRING_F_LOG flag is set).
    pub log_addr: Option<u64>,
    /// Next available index to process (SET_VRING_BASE; updated when the
    /// ring stops).
    pub base: u16,
    pub enabled: bool,
    /// The frontend disabled the ring (SET_VRING_ENABLE 0) and has not
    /// enabled it since: it means to use fewer queue pairs, which a ring
    /// merely not enabled yet (a frontend setting rings up one by one)
    /// does not say.
    pub disabled: bool,
    /// A kick fd arrived and no GET_VRING_BASE stopped the ring since.
    pub started: bool,
    /// The ring is running in the datapath (or as the control queue).
    pub running: bool,
    pub kick: Option<Arc<OwnedFd>>,
    pub call: Option<Arc<OwnedFd>>,
    pub err: Option<OwnedFd>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VringError {
    /// The ring lacks a size, addresses or a kick fd.
    #[error("ring {0} is not fully configured")]
    NotConfigured(u16),
    /// The size is zero, not a power of two, or too large.
    #[error("ring {index}: invalid size {num}")]
    BadSize { index: u16, num: u16 },
    /// A ring address is misaligned or not inside guest memory.
    #[error("ring {index}: {part} ring at {va:#x} is not inside guest memory or misaligned")]
    BadAddress {
        index: u16,
        part: &'static str,
        va: u64,
    },
}

/// A started virtqueue.
///
/// Used-ring entries go through [`Vring::push_used`] and become visible to
/// the driver at the next [`Vring::notify`], which stores the used index
/// once for the whole batch. `virtio_queue`'s `add_used` stores it after
/// every entry; the driver polls that cache line, so each store cost a
/// cross-core transfer per frame.
pub struct Vring {
    pub index: u16,
    pub queue: Queue,
    pub kick: Arc<OwnedFd>,
    pub call: Option<Arc<OwnedFd>>,
    /// Entries written to the used ring but not yet published.
    unpublished: u16,
    /// The used index when the driver was last considered for a
    /// notification (EVENT_IDX: it wants one when `used_event` was passed
    /// since). None until the first notification after the ring started:
    /// that one goes out whatever `used_event` says (see `start`).
    last_checked_used: Option<Wrapping<u16>>,
    /// While a migration logs dirty pages: the log and the guest address
    /// the used ring's writes are logged at.
    used_log: Option<(Arc<DirtyLog>, u64)>,
}

impl Vring {
    /// Starts ring `index` as configured in `setup`, at `setup.base`.
    /// With `log`, every used-ring write is marked in it (at the ring's
    /// `log_addr`, or where the used ring lies in guest memory when the
    /// frontend gave none).
    ///
    /// A ring that starts again (a VM migration's destination, `stop` and
    /// `cont`, a handover) signals the driver once at once, and again at
    /// its first publish whatever `used_event` says (as Linux's vhost
    /// does): a notification the old backend or the old call fd took in the
    /// switch is otherwise lost for good. The driver then waits for an
    /// interrupt for entries already in the used ring, and its `used_event`
    /// stays where it was, behind every index published from then on, so
    /// that no later entry passes it either. Seen after QEMU local
    /// migrations: the backend kept filling the RX ring, and the guest never
    /// answered again. A spurious interrupt costs the driver one look at
    /// the ring.
    pub fn start(
        index: u16,
        setup: &VringSetup,
        memory: &GuestMemory,
        event_idx: bool,
        log: Option<&Arc<DirtyLog>>,
    ) -> Result<Self, VringError> {
        let (Some(addrs), Some(kick)) = (setup.addrs, setup.kick.clone()) else {
            return Err(VringError::NotConfigured(index));
        };
        let num = setup.num;
        if !valid_size(num) {
            return Err(VringError::BadSize { index, num });
        }
        let [desc, avail, used] = addrs.parts(num).map(|(part, va, len)| {
            memory
                .va_to_gpa(va, len)
                .ok_or(VringError::BadAddress { index, part, va })
        });
        let (desc, avail, used) = (desc?, avail?, used?);
        let bad = |part, va| VringError::BadAddress { index, part, va };
        let mut queue =
            Queue::new(MAX_QUEUE_SIZE).map_err(|_| VringError::BadSize { index, num })?;
        queue
            .try_set_size(num)
            .map_err(|_| VringError::BadSize { index, num })?;
        queue
            .try_set_desc_table_address(desc)
            .map_err(|_| bad("descriptor", addrs.desc))?;
        queue
            .try_set_avail_ring_address(avail)
            .map_err(|_| bad("available", addrs.avail))?;
        queue
            .try_set_used_ring_address(used)
            .map_err(|_| bad("used", addrs.used))?;
        queue.set_event_idx(event_idx);
        queue.set_next_avail(setup.base);
        let used_idx = queue
            .used_idx(memory.mmap(), Ordering::Acquire)
            .map_err(|_| bad("used", addrs.used))?;
        queue.set_next_used(used_idx.0);
        queue.set_ready(true);
        let used_log = log.map(|log| (log.clone(), setup.log_addr.unwrap_or(used.0)));
        if let Some(call) = &setup.call {
            notify::signal(call.as_fd());
        }
        Ok(Self {
            index,
            queue,
            kick,
            call: setup.call.clone(),
            unpublished: 0,
            last_checked_used: None,
            used_log,
        })
    }

    /// Returns chain `head` to the driver with `len` bytes written, once the
    /// next [`Vring::notify`] publishes it. Heads come from this ring's own
    /// iterator, so they are within the ring; anything else is ignored.
    pub fn push_used(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32) {
        let size = self.queue.size();
        if head >= size || self.unpublished >= size {
            return;
        }
        let slot = self.queue.next_used().wrapping_add(self.unpublished) % size;
        let element = u64::from(head) | (u64::from(len) << 32);
        let addr = GuestAddress(self.queue.used_ring())
            .checked_add(USED_RING_HEADER + u64::from(slot) * USED_ELEMENT_SIZE);
        // The used ring was checked to lie in guest memory when the ring
        // started; a failed write would mean it no longer does, and the
        // entry is then lost like any write to a broken ring.
        if let Some(addr) = addr {
            let _ = mem.write_obj(element.to_le(), addr);
        }
        self.log_used_write(USED_RING_HEADER + u64::from(slot) * USED_ELEMENT_SIZE, 8);
        self.unpublished += 1;
    }

    /// Makes the pushed entries visible: one release store of the used
    /// index after all their elements.
    pub fn publish_used(&mut self, mem: &GuestMemoryMmap) {
        if self.unpublished == 0 {
            return;
        }
        let next = self.queue.next_used().wrapping_add(self.unpublished);
        self.unpublished = 0;
        self.queue.set_next_used(next);
        if let Some(addr) = GuestAddress(self.queue.used_ring()).checked_add(USED_IDX_OFFSET) {
            let _ = mem.store(next.to_le(), addr, Ordering::Release);
        }
        self.log_used_write(USED_IDX_OFFSET, 2);
    }

    /// Marks `len` bytes at `offset` into the used ring dirty, if logging.
    fn log_used_write(&self, offset: u64, len: u64) {
        if let Some((log, used_gpa)) = &self.used_log {
            log.mark(used_gpa.wrapping_add(offset), len);
        }
    }

    /// Publishes pushed entries and signals the driver if its notification
    /// rules ask for it.
    pub fn notify(&mut self, mem: &GuestMemoryMmap) {
        self.publish_used(mem);
        if self.needs_notification(mem) {
            if let Some(call) = &self.call {
                notify::signal(call.as_fd());
            }
        }
    }

    /// Without EVENT_IDX always (as `virtio_queue` does; the NO_INTERRUPT
    /// hint is optional). With it, when the driver's `used_event` lies in
    /// the entries published since the last check (virtio 1.2 §2.7.10, the
    /// same inequality Linux uses). An unreadable `used_event` means a
    /// broken ring: notify anyway, the driver will find out.
    fn needs_notification(&mut self, mem: &GuestMemoryMmap) -> bool {
        let new = Wrapping(self.queue.next_used());
        let Some(old) = self.last_checked_used.replace(new) else {
            return true;
        };
        if !self.queue.event_idx_enabled() {
            return true;
        }
        // The used index store must be visible before used_event is read,
        // or a driver re-arming in between would be missed.
        fence(Ordering::SeqCst);
        let event_offset = AVAIL_RING_HEADER + 2 * u64::from(self.queue.size());
        let Some(addr) = GuestAddress(self.queue.avail_ring()).checked_add(event_offset) else {
            return true;
        };
        match mem.load::<u16>(addr, Ordering::Relaxed) {
            Ok(event) => new - Wrapping(u16::from_le(event)) - Wrapping(1) < new - old,
            Err(_) => true,
        }
    }

    /// Where the backend's notification switch lies in the used ring: with
    /// EVENT_IDX `avail_event` (after the ring's entries), otherwise the
    /// `flags` word (its NO_NOTIFY bit). Both are the backend's writes to
    /// guest memory, so a migration's log must mark them like used entries.
    fn notification_switch(&self) -> (u64, u64) {
        if self.queue.event_idx_enabled() {
            let entries = USED_RING_HEADER + USED_ELEMENT_SIZE * u64::from(self.queue.size());
            (entries, 2)
        } else {
            (0, 2)
        }
    }

    /// Asks the driver not to kick while the ring is being drained (only
    /// without EVENT_IDX does this write anything: the NO_NOTIFY flag).
    pub fn disable_notification(&mut self, mem: &GuestMemoryMmap) {
        if self.queue.event_idx_enabled() {
            return;
        }
        let _ = self.queue.disable_notification(mem);
        let (offset, len) = self.notification_switch();
        self.log_used_write(offset, len);
    }

    /// Re-enables notifications, then says whether the driver published new
    /// entries meanwhile (so the caller looks again instead of sleeping).
    ///
    /// Only a *valid* backlog counts: an available index more than a ring's
    /// worth ahead is corrupt, `pop` refuses it, and answering "more" here
    /// would send the caller round forever.
    pub fn enable_and_recheck(&mut self, mem: &GuestMemoryMmap) -> bool {
        let enabled = self.queue.enable_notification(mem);
        let (offset, len) = self.notification_switch();
        self.log_used_write(offset, len);
        if !matches!(enabled, Ok(true)) {
            return false;
        }
        self.has_chains(mem)
    }

    /// Whether the driver has published chains not taken yet (a valid
    /// backlog only: see `enable_and_recheck`).
    pub fn has_chains(&self, mem: &GuestMemoryMmap) -> bool {
        match self.queue.avail_idx(mem, Ordering::Acquire) {
            Ok(avail) => {
                let backlog = avail.0.wrapping_sub(self.queue.next_avail());
                backlog > 0 && backlog <= self.queue.size()
            }
            Err(_) => false,
        }
    }

    /// Gives the last `n` chains taken back to the available ring (taken,
    /// not used: the driver sees nothing).
    pub fn untake(&mut self, n: u16) {
        self.queue
            .set_next_avail(self.queue.next_avail().wrapping_sub(n));
    }

    /// The next chain, or none when the ring is empty or its available
    /// index is corrupt (more entries than the ring holds).
    pub fn pop<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
    ) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
        self.queue.iter(mem).ok()?.next()
    }
}

/// Why a chain is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    Empty,
    /// The walk ended on a descriptor that still points onwards: a loop, a
    /// next index past the table, or a broken indirect table.
    Truncated,
    WrongDirection,
    OutsideMemory,
    TooLong,
    TooManySegments,
}

/// Collects the host ranges of every buffer in `chain`, which must all be
/// device-writable (`writable`) or all device-readable, at most `max_len`
/// bytes in total. Returns the total length.
pub fn chain_iovecs(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    writable: bool,
    max_len: u64,
    out: &mut Vec<IoVec>,
) -> Result<u64, ChainError> {
    let start = out.len();
    let result = collect(chain, mem, writable, max_len, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn collect(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    writable: bool,
    max_len: u64,
    out: &mut Vec<IoVec>,
) -> Result<u64, ChainError> {
    let start = out.len();
    let mut total = 0u64;
    let mut last_points_on = false;
    let mut count = 0usize;
    for desc in chain {
        count += 1;
        last_points_on = desc.has_next();
        if desc.is_write_only() != writable {
            return Err(ChainError::WrongDirection);
        }
        total += u64::from(desc.len());
        if total > max_len {
            return Err(ChainError::TooLong);
        }
        translate(mem, desc.addr(), desc.len(), out).map_err(|_| ChainError::OutsideMemory)?;
        if out.len() - start > MAX_SEGMENTS {
            return Err(ChainError::TooManySegments);
        }
    }
    if last_points_on {
        return Err(ChainError::Truncated);
    }
    if count == 0 || total == 0 {
        return Err(ChainError::Empty);
    }
    Ok(total)
}

/// Marks the guest pages behind the first `len` bytes of `iov` dirty.
pub fn log_iov_write(log: &DirtyLog, mem: &GuestMemoryMmap, iov: &[IoVec], len: usize) {
    let mut left = len;
    for v in iov {
        if left == 0 {
            break;
        }
        let n = v.len().min(left);
        if let Some(gpa) = host_to_gpa(mem, v.host_address()) {
            log.mark(gpa.0, n as u64);
        }
        left -= n;
    }
}

/// Copies bytes at `offset` of the buffers in `iov` into `out` (as many as
/// there are); returns how many were copied.
///
/// # Safety
///
/// The guest memory `iov` was translated against (`chain_iovecs`) must
/// still be mapped. The guest may change those bytes meanwhile: they are
/// copied as they are, never trusted.
pub unsafe fn read_iov(iov: &[IoVec], offset: usize, out: &mut [u8]) -> usize {
    walk_iov(iov, offset, out.len(), |ptr, done, n| {
        // SAFETY: `ptr..ptr+n` lies inside a buffer of `iov`, which points
        // into guest memory the caller keeps mapped (this function's
        // contract); `out[done..done+n]` is in bounds by construction.
        unsafe { std::ptr::copy_nonoverlapping(ptr, out[done..].as_mut_ptr(), n) }
    })
}

/// Writes `data` at `offset` of the buffers in `iov`; returns how many bytes
/// fitted.
///
/// # Safety
///
/// As for `read_iov`; and the buffers must be ones the guest handed to the
/// device to write (device-writable descriptors).
pub unsafe fn write_iov(iov: &[IoVec], offset: usize, data: &[u8]) -> usize {
    walk_iov(iov, offset, data.len(), |ptr, done, n| {
        // SAFETY: as in `read_iov`; the caller promises the buffers are the
        // guest's device-writable ones.
        unsafe { std::ptr::copy_nonoverlapping(data[done..].as_ptr(), ptr, n) }
    })
}

fn walk_iov(
    iov: &[IoVec],
    mut offset: usize,
    len: usize,
    mut f: impl FnMut(*mut u8, usize, usize),
) -> usize {
    let mut done = 0;
    for v in iov {
        if done == len {
            break;
        }
        if offset >= v.len() {
            offset -= v.len();
            continue;
        }
        let n = (v.len() - offset).min(len - done);
        f(v.host_address().wrapping_add(offset), done, n);
        done += n;
        offset = 0;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::super::testing::{Buffer, DriverRing, GuestRam};
    use super::*;

    fn started(ram: &GuestRam, driver: &DriverRing, event_idx: bool) -> Vring {
        let ring = Vring::start(1, &driver.setup(), &ram.memory, event_idx, None).unwrap();
        // Starting signals the driver once (see `start`).
        assert_eq!(driver.notifications(), 1);
        ring
    }

    /// Offers and takes one chain, pushing it to the used ring.
    fn use_one(ram: &GuestRam, driver: &mut DriverRing, ring: &mut Vring) -> u16 {
        let buffer = Buffer {
            addr: ram.alloc(64),
            len: 64,
            device_writes: false,
        };
        let head = driver.offer(ram, &[buffer]);
        let chain = ring.pop(ram.memory.mmap()).expect("the chain offered");
        assert_eq!(chain.head_index(), head);
        ring.push_used(ram.memory.mmap(), head, 7);
        head
    }

    #[test]
    fn used_entries_are_visible_only_once_published() {
        let ram = GuestRam::new();
        let mut driver = DriverRing::new(&ram, 8);
        let mut ring = started(&ram, &driver, false);
        let a = use_one(&ram, &mut driver, &mut ring);
        let b = use_one(&ram, &mut driver, &mut ring);
        assert_eq!(driver.used_idx(&ram), 0, "pushed, not yet published");
        ring.notify(ram.memory.mmap());
        assert_eq!(
            driver.take_used(&ram),
            vec![(u32::from(a), 7), (u32::from(b), 7)]
        );
        assert_eq!(driver.notifications(), 1, "one signal for the batch");
        ring.notify(ram.memory.mmap());
        assert_eq!(driver.used_idx(&ram), 2, "nothing new to publish");
    }

    #[test]
    fn a_head_outside_the_ring_is_never_written() {
        let ram = GuestRam::new();
        let driver = DriverRing::new(&ram, 8);
        let mut ring = started(&ram, &driver, false);
        ring.push_used(ram.memory.mmap(), 8, 1);
        ring.push_used(ram.memory.mmap(), u16::MAX, 1);
        ring.publish_used(ram.memory.mmap());
        assert_eq!(driver.used_idx(&ram), 0);
    }

    #[test]
    fn event_idx_notifies_when_used_event_is_passed_and_not_before() {
        let ram = GuestRam::new();
        let mut driver = DriverRing::new(&ram, 8);
        let mut ring = started(&ram, &driver, true);
        driver.set_used_event(&ram, 0);
        let mut signalled = Vec::new();
        for _ in 0..6 {
            use_one(&ram, &mut driver, &mut ring);
            ring.notify(ram.memory.mmap());
            signalled.push(driver.notifications());
            if driver.used_idx(&ram) == 2 {
                // The driver re-arms: wake me once entry 4 is used.
                driver.set_used_event(&ram, 4);
            }
        }
        // The first publish after a start always signals (see `start`);
        // then only the one that moves the index past used_event = 4.
        assert_eq!(signalled, [1, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn event_idx_counts_across_the_index_wrap() {
        let ram = GuestRam::new();
        let mut driver = DriverRing::new(&ram, 8);
        driver.start_at(&ram, 65_533);
        let mut ring = started(&ram, &driver, true);
        // Take the unconditional first notification out of the way.
        use_one(&ram, &mut driver, &mut ring);
        ring.notify(ram.memory.mmap());
        assert_eq!((driver.used_idx(&ram), driver.notifications()), (65_534, 1));
        driver.set_used_event(&ram, 65_535);
        let mut seen = Vec::new();
        for _ in 0..4 {
            use_one(&ram, &mut driver, &mut ring);
            ring.notify(ram.memory.mmap());
            seen.push((driver.used_idx(&ram), driver.notifications()));
            if driver.used_idx(&ram) == 0 {
                driver.set_used_event(&ram, 1);
            }
        }
        assert_eq!(seen, [(65_535, 0), (0, 1), (1, 0), (2, 1)]);
        assert_eq!(
            driver.take_used(&ram).len(),
            5,
            "every entry across the wrap"
        );
    }

    #[test]
    fn a_batch_that_jumps_over_used_event_notifies_once() {
        let ram = GuestRam::new();
        let mut driver = DriverRing::new(&ram, 8);
        driver.start_at(&ram, 65_530);
        let mut ring = started(&ram, &driver, true);
        use_one(&ram, &mut driver, &mut ring);
        ring.notify(ram.memory.mmap());
        assert_eq!(driver.notifications(), 1);
        // used_event 65_533 lies inside the next batch, which wraps.
        driver.set_used_event(&ram, 65_533);
        for _ in 0..7 {
            use_one(&ram, &mut driver, &mut ring);
        }
        ring.notify(ram.memory.mmap());
        assert_eq!((driver.used_idx(&ram), driver.notifications()), (2, 1));
        // used_event now behind the index: no signal until it is re-armed.
        use_one(&ram, &mut driver, &mut ring);
        ring.notify(ram.memory.mmap());
        assert_eq!(driver.notifications(), 0);
    }

    #[test]
    fn without_event_idx_every_publish_notifies() {
        let ram = GuestRam::new();
        let mut driver = DriverRing::new(&ram, 8);
        let mut ring = started(&ram, &driver, false);
        for _ in 0..3 {
            use_one(&ram, &mut driver, &mut ring);
            ring.notify(ram.memory.mmap());
            assert_eq!(driver.notifications(), 1);
        }
    }

    #[test]
    fn kicks_are_switched_off_while_draining_and_a_late_entry_is_seen() {
        let ram = GuestRam::new();
        let used_flags = |driver: &DriverRing| ram.read(driver.addrs.used, 2)[0];
        // Without EVENT_IDX: the NO_NOTIFY flag.
        let mut driver = DriverRing::new(&ram, 8);
        let mut ring = started(&ram, &driver, false);
        ring.disable_notification(ram.memory.mmap());
        assert_eq!(used_flags(&driver), 1);
        assert!(!ring.enable_and_recheck(ram.memory.mmap()), "nothing new");
        assert_eq!(used_flags(&driver), 0);
        ring.disable_notification(ram.memory.mmap());
        let buffer = Buffer {
            addr: ram.alloc(64),
            len: 64,
            device_writes: false,
        };
        driver.offer(&ram, &[buffer]);
        assert!(
            ring.enable_and_recheck(ram.memory.mmap()),
            "offered meanwhile"
        );
        // With EVENT_IDX: avail_event says where the next kick is wanted.
        let mut driver = DriverRing::new(&ram, 8);
        let mut ring = started(&ram, &driver, true);
        use_one(&ram, &mut driver, &mut ring);
        assert!(!ring.enable_and_recheck(ram.memory.mmap()));
        let avail_event = ram.read(driver.addrs.used + 4 + 8 * 8, 2);
        assert_eq!(u16::from_le_bytes([avail_event[0], avail_event[1]]), 1);
    }

    #[test]
    fn a_corrupt_available_index_is_no_backlog() {
        let ram = GuestRam::new();
        let driver = DriverRing::new(&ram, 8);
        let mut ring = started(&ram, &driver, false);
        // 100 entries ahead of a ring of 8.
        ram.write(driver.addrs.avail + 2, &100u16.to_le_bytes());
        assert!(!ring.enable_and_recheck(ram.memory.mmap()));
        assert!(ring.pop(ram.memory.mmap()).is_none());
    }

    #[test]
    fn ring_parts_span_what_the_spec_lays_out() {
        let addrs = RingAddrs {
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
        };
        assert_eq!(
            addrs.parts(256),
            [
                ("descriptor", 0x1000, 4096),
                ("available", 0x2000, 518),
                ("used", 0x3000, 2054)
            ]
        );
        assert!(valid_size(1) && valid_size(32_768));
        assert!(!valid_size(0) && !valid_size(100) && !valid_size(u16::MAX));
    }
}
