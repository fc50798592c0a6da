//! The test frontend's "guest RAM": a memfd shared with the backend through
//! SET_MEM_TABLE, and a bump allocator for rings and buffers.

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};

/// Guest-physical base of the RAM. Not 0: a ring at address 0 means "not
/// configured" to virtio-queue.
pub const RAM_BASE: u64 = 0x4000_0000;

pub struct GuestRam {
    fd: OwnedFd,
    mem: GuestMemoryMmap,
    size: u64,
    next: std::cell::Cell<u64>,
}

impl GuestRam {
    pub fn new(size: u64) -> anyhow::Result<Self> {
        let fd = memfd_create(c"sandnic-test-ram", MemFdCreateFlag::MFD_CLOEXEC)?;
        nix::unistd::ftruncate(&fd, size as i64)?;
        let file = File::from(fd.try_clone()?);
        let region = MmapRegion::<()>::from_file(FileOffset::new(file, 0), size as usize)?;
        let region = GuestRegionMmap::new(region, GuestAddress(RAM_BASE))
            .ok_or_else(|| anyhow::anyhow!("region"))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])?;
        Ok(Self {
            fd,
            mem,
            size,
            next: std::cell::Cell::new(RAM_BASE + 4096),
        })
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// This process's virtual address of the RAM (the "user address" of
    /// SET_MEM_TABLE, as a VMM would send it).
    pub fn host_address(&self) -> u64 {
        self.mem
            .get_host_address(GuestAddress(RAM_BASE))
            .expect("mapped") as u64
    }

    /// This process's pointer to guest address `gpa` (which must lie in the
    /// RAM, with `len` bytes after it). Valid while `self` lives.
    pub fn ptr(&self, gpa: GuestAddress, len: u64) -> *mut u8 {
        assert!(
            gpa.0 >= RAM_BASE && gpa.0 + len <= RAM_BASE + self.size,
            "{gpa:?}+{len} outside the test RAM"
        );
        (self.host_address() + (gpa.0 - RAM_BASE)) as *mut u8
    }

    /// Guest address of the VA `va` (inverse of the frontend's mapping).
    pub fn va_of(&self, gpa: GuestAddress) -> u64 {
        self.host_address() + (gpa.0 - RAM_BASE)
    }

    /// `len` bytes aligned to `align`, never freed.
    pub fn alloc(&self, len: u64, align: u64) -> GuestAddress {
        let start = self.next.get().next_multiple_of(align);
        assert!(
            start + len <= RAM_BASE + self.size,
            "test guest RAM exhausted"
        );
        self.next.set(start + len);
        GuestAddress(start)
    }
}
