//! The host's vring processing over a fuzzed guest-memory image: descriptor
//! loops, out-of-range addresses, odd lengths, indirect tables, corrupt
//! ring indices. TX goes to /dev/null, RX reads a frame from a socketpair;
//! whatever the guest wrote, nothing panics and every used entry is a head
//! the ring owns.
//!
//! With flag bit 2 the harness itself lays out one RX chain as an indirect
//! table of 900 to 2099 tiny descriptors, around the 1024 segments one
//! `readv` takes (a hostile guest's way to make RX spin, which the fuzzer
//! would hardly find by chance): a chain past the cap must come back as a
//! bad chain, one within it must take the frame.

#![no_main]
use libfuzzer_sys::fuzz_target;
use sandnic_host::memory::guest_memory::{GuestMemory, RegionInfo};
use sandnic_host::datapath::rate_limit::Allowance;
use sandnic_host::datapath::rx::{process_rx, RxContext, RxPending};
use sandnic_host::datapath::rx_filter::NativeFilter;
use sandnic_host::datapath::tx::{process_tx, TxContext};
use sandnic_host::datapath::vring::{RingAddrs, Vring, VringSetup, MAX_SEGMENTS};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 128 * 1024;
const BASE: u64 = 0x10000;

fn memory(image: &[u8]) -> GuestMemory {
    let fd = nix::sys::memfd::memfd_create(c"fuzz-ram", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC).expect("memfd");
    nix::unistd::ftruncate(&fd, MEM as i64).expect("ftruncate");
    let region = RegionInfo { guest_phys_addr: BASE, memory_size: MEM, userspace_addr: BASE, mmap_offset: 0 };
    let mem = GuestMemory::map(vec![region], vec![fd]).expect("map");
    mem.mmap().write_slice(&image[..image.len().min(MEM as usize)], GuestAddress(BASE)).expect("image");
    mem
}

fn ring(index: u16, num: u16, memory: &GuestMemory, at: u64, event_idx: bool) -> Option<Vring> {
    let kick: OwnedFd = nix::sys::eventfd::EventFd::new().expect("eventfd").into();
    let n = u64::from(num);
    let setup = VringSetup {
        num,
        addrs: Some(RingAddrs { desc: at, avail: at + 16 * n, used: (at + 16 * n + 6 + 2 * n).next_multiple_of(4) }),
        enabled: true,
        started: true,
        kick: Some(Arc::new(kick)),
        ..VringSetup::default()
    };
    Vring::start(index, &setup, memory, event_idx, None).ok()
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

fn descriptor(mem: &GuestMemory, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.mmap().write_slice(&d, GuestAddress(at)).expect("descriptor");
}

/// Makes the RX ring (at `ring_at`, `num` entries) offer one chain: an
/// indirect table of `segments` device-writable descriptors of `piece`
/// bytes each. Returns the chain's capacity.
fn many_segment_chain(mem: &GuestMemory, ring_at: u64, num: u16, segments: u16, piece: u32) -> u64 {
    let table = ring_at + 16 * 1024;
    let buffers = BASE + 8 * 1024;
    for i in 0..segments {
        let last = i + 1 == segments;
        let flags = if last { F_WRITE } else { F_WRITE | F_NEXT };
        let addr = buffers + u64::from(i) * u64::from(piece);
        descriptor(mem, table + 16 * u64::from(i), addr, piece, flags, i.wrapping_add(1));
    }
    descriptor(mem, ring_at, table, u32::from(segments) * 16, F_INDIRECT, 0);
    let avail = ring_at + 16 * u64::from(num);
    // flags 0, idx 1, ring[0] = head 0
    mem.mmap().write_slice(&[0, 0, 1, 0, 0, 0], GuestAddress(avail)).expect("avail");
    u64::from(segments) * u64::from(piece)
}

fuzz_target!(|data: &[u8]| {
    let Some((&[size_sel, flags], image)) = data.split_first_chunk::<2>() else { return };
    let num = 1u16 << (size_sel % 9);
    let event_idx = flags & 1 != 0;
    let mergeable = flags & 2 != 0;
    let crafted = flags & 4 != 0;
    // A rate limit's allowance of 1-16 frames: the chains beyond it must
    // go back to the ring untouched.
    let limited = flags & 8 != 0;
    let mem = memory(image);
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null").expect("/dev/null");
    // TX ring at the start of memory, RX ring in the middle.
    if let Some(mut tx) = ring(1, num, &mem, BASE, event_idx) {
        let ctx = TxContext { mem: mem.mmap(), tap: null.as_fd(), hdr_len: 12, link_up: true };
        let mut iov = Vec::new();
        let mut allowance = Allowance::unlimited();
        if limited {
            allowance.frames = 1 + i64::from(flags >> 4);
        }
        let allowed = allowance.frames;
        let (batch, _) = process_tx(&mut tx, &ctx, &mut iov, 256, &mut allowance);
        assert!(batch.packets + batch.drops + batch.bad_chains <= 256);
        assert!(batch.packets as i64 <= allowed, "{} sent, {allowed} allowed", batch.packets);
    }
    let (peer, tap) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
    tap.set_nonblocking(true).expect("nonblocking");
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&image[..image.len().min(200)]);
    let _ = peer.send(&frame);
    let rx_at = BASE + MEM / 2;
    let crafted = crafted.then(|| {
        let pick = |i: usize| image.get(i).copied().unwrap_or(0);
        let segments = 900 + u16::from_le_bytes([pick(0), pick(1)]) % 1200;
        let piece = 1 + u32::from(pick(2) % 4);
        (segments, many_segment_chain(&mem, rx_at, num, segments, piece))
    });
    if let Some(mut rx) = ring(0, num, &mem, rx_at, event_idx) {
        let filter = NativeFilter::default();
        let ctx = RxContext {
            mem: mem.mmap(),
            tap: tap.as_fd(),
            hdr_len: 12,
            mergeable,
            frame_room: 1600,
            filter: &filter,
            link_up: true,
            dirty_log: None,
        };
        let mut pending = RxPending::default();
        let (batch, _) = process_rx(&mut rx, &mut pending, &ctx, 16, &mut Allowance::unlimited());
        if let Some((segments, capacity)) = crafted {
            if usize::from(segments) > MAX_SEGMENTS {
                assert_eq!(batch.bad_chains, 1, "{segments} segments: returned unused");
            } else if capacity >= frame.len() as u64 && !mergeable {
                let taken = batch.packets + batch.drops + batch.filtered;
                assert_eq!(taken, 1, "{segments} segments: the frame taken");
            }
        }
        pending.rewind(&mut rx);
    }
});
