//! The host's vring processing over a fuzzed guest-memory image: descriptor
//! loops, out-of-range addresses, odd lengths, indirect tables, corrupt
//! ring indices. TX goes to /dev/null, RX reads a frame from a socketpair;
//! whatever the guest wrote, nothing panics and every used entry is a head
//! the ring owns.

#![no_main]
use libfuzzer_sys::fuzz_target;
use sandnic_host::memory::guest_memory::{GuestMemory, RegionInfo};
use sandnic_host::datapath::rx::{process_rx, RxContext, RxPending};
use sandnic_host::datapath::rx_filter::NativeFilter;
use sandnic_host::datapath::tx::{process_tx, TxContext};
use sandnic_host::datapath::vring::{RingAddrs, Vring, VringSetup};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 64 * 1024;
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

fuzz_target!(|data: &[u8]| {
    let Some((&[size_sel, flags], image)) = data.split_first_chunk::<2>() else { return };
    let num = 1u16 << (size_sel % 9);
    let event_idx = flags & 1 != 0;
    let mergeable = flags & 2 != 0;
    let mem = memory(image);
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null").expect("/dev/null");
    // TX ring at the start of memory, RX ring in the middle.
    if let Some(mut tx) = ring(1, num, &mem, BASE, event_idx) {
        let ctx = TxContext { mem: mem.mmap(), tap: null.as_fd(), hdr_len: 12, link_up: true };
        let mut iov = Vec::new();
        let (batch, _) = process_tx(&mut tx, &ctx, &mut iov, 256);
        assert!(batch.packets + batch.drops + batch.bad_chains <= 256);
    }
    let (peer, tap) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
    tap.set_nonblocking(true).expect("nonblocking");
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&image[..image.len().min(200)]);
    let _ = peer.send(&frame);
    if let Some(mut rx) = ring(0, num, &mem, BASE + MEM / 2, event_idx) {
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
        let _ = process_rx(&mut rx, &mut pending, &ctx, 16);
        pending.rewind(&mut rx);
    }
});
