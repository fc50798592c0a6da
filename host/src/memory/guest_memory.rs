//! Guest memory as the frontend describes it in SET_MEM_TABLE: regions of
//! shared files (memfd, UML's physmem file) mapped into this process.
//!
//! Two address spaces meet here. Descriptor addresses are guest-physical;
//! the ring addresses of SET_VRING_ADDR are the *frontend's* virtual
//! addresses and must be translated through the region table (for UML the
//! two coincide; for QEMU they do not).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress, MmapRegion,
};

/// One SET_MEM_TABLE region as sent (without its fd).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegionInfo {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
    pub mmap_offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A region's numbers do not describe a mappable range.
    #[error("memory region {0:?} is invalid (empty, overflowing or not page aligned)")]
    BadRegion(RegionInfo),
    /// mmap of a region failed.
    #[error("mapping memory region {region:?}: {error}")]
    Map { region: RegionInfo, error: String },
    /// The region reaches past the end of its file: mapping it would work,
    /// but the first access beyond the file would kill the process (SIGBUS).
    #[error("memory region {region:?} reaches past the end of its file ({file_len} bytes)")]
    PastEndOfFile { region: RegionInfo, file_len: u64 },
    /// Regions overlap or cannot form a guest address space.
    #[error("memory regions do not form a guest address space: {0}")]
    Layout(String),
    /// The number of fds does not match the number of regions.
    #[error("{regions} memory regions but {fds} fds")]
    FdCount { regions: usize, fds: usize },
}

/// The mapped guest memory plus what is needed to describe it again (for a
/// handover: the region table and the fds).
pub struct GuestMemory {
    mem: GuestMemoryMmap,
    regions: Vec<RegionInfo>,
}

const PAGE: u64 = 4096;

impl GuestMemory {
    /// Maps every region from its fd.
    pub fn map(regions: Vec<RegionInfo>, fds: Vec<OwnedFd>) -> Result<Self, MemoryError> {
        if regions.len() != fds.len() {
            return Err(MemoryError::FdCount {
                regions: regions.len(),
                fds: fds.len(),
            });
        }
        let mut mapped = Vec::with_capacity(regions.len());
        for (info, fd) in regions.iter().zip(fds) {
            let valid = info.memory_size > 0
                && info.mmap_offset % PAGE == 0
                && info.guest_phys_addr.checked_add(info.memory_size).is_some()
                && info.userspace_addr.checked_add(info.memory_size).is_some()
                && info.mmap_offset.checked_add(info.memory_size).is_some()
                && usize::try_from(info.memory_size).is_ok();
            if !valid {
                return Err(MemoryError::BadRegion(*info));
            }
            let file = File::from(fd);
            check_backed(&file, info)?;
            let mmap = MmapRegion::<()>::from_file(
                FileOffset::new(file, info.mmap_offset),
                info.memory_size as usize,
            )
            .map_err(|e| MemoryError::Map {
                region: *info,
                error: e.to_string(),
            })?;
            let region = GuestRegionMmap::new(mmap, GuestAddress(info.guest_phys_addr))
                .ok_or(MemoryError::BadRegion(*info))?;
            mapped.push(region);
        }
        mapped.sort_by_key(|r| r.start_addr());
        let mem = GuestMemoryMmap::from_regions(mapped)
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        Ok(Self { mem, regions })
    }

    pub fn mmap(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The first guest address above every region (what a dirty log must
    /// cover).
    pub fn end(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.guest_phys_addr + r.memory_size)
            .max()
            .unwrap_or(0)
    }

    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }

    /// The fd behind each region, in `regions()` order (for a handover).
    pub fn region_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.regions
            .iter()
            .filter_map(|info| self.mem.find_region(GuestAddress(info.guest_phys_addr)))
            .filter_map(|region| region.file_offset().map(|f| f.file().as_fd()))
            .collect()
    }

    /// Translates a frontend virtual address range (a ring) to a guest
    /// address; the whole range must lie in one region.
    pub fn va_to_gpa(&self, va: u64, len: u64) -> Option<GuestAddress> {
        self.regions.iter().find_map(|r| {
            let offset = va.checked_sub(r.userspace_addr)?;
            (offset.checked_add(len)? <= r.memory_size)
                .then(|| GuestAddress(r.guest_phys_addr + offset))
        })
    }

    /// Reads one byte of every page of a frontend virtual address range
    /// (a ring), so that its page-table entries exist before they are
    /// needed. Addresses outside guest memory are skipped: the ring's own
    /// checks report them when it starts.
    pub fn prefault(&self, va: u64, len: u64) {
        const PAGE: u64 = 4096;
        let Some(start) = self.va_to_gpa(va, len) else {
            return;
        };
        let mut offset = 0;
        while offset < len {
            let Some(gpa) = start.0.checked_add(offset) else {
                return;
            };
            let _ = self.mem.read_obj::<u8>(GuestAddress(gpa));
            offset += PAGE - gpa % PAGE;
        }
    }
}

/// A region must lie inside its file when the file is a regular one (a
/// memfd, UML's physmem file, a file on hugetlbfs or tmpfs): the frontend
/// chooses the numbers, and a page past the end would SIGBUS the datapath.
fn check_backed(file: &File, info: &RegionInfo) -> Result<(), MemoryError> {
    let meta = file.metadata().map_err(|e| MemoryError::Map {
        region: *info,
        error: e.to_string(),
    })?;
    let end = info.mmap_offset.saturating_add(info.memory_size);
    if meta.file_type().is_file() && end > meta.len() {
        return Err(MemoryError::PastEndOfFile {
            region: *info,
            file_len: meta.len(),
        });
    }
    Ok(())
}

/// A guest buffer as host memory, for readv/writev. Its fields are private
/// and only `translate` makes one, from a range it checked against guest
/// memory, so an `IoVec` cannot be built from an arbitrary pointer: it
/// always points into a guest-memory mapping. That mapping must still be
/// mapped when the buffer is used, which is why the functions that touch
/// the memory behind it are `unsafe` (`vring::read_iov`, `write_iov`, and
/// the readv/writev calls of the datapath).
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct IoVec(libc::iovec);

impl IoVec {
    pub fn len(&self) -> usize {
        self.0.iov_len
    }

    pub fn is_empty(&self) -> bool {
        self.0.iov_len == 0
    }

    /// Where the buffer starts in this process (for address arithmetic,
    /// such as finding its guest page; not to be dereferenced here).
    pub fn host_address(&self) -> *mut u8 {
        self.0.iov_base.cast()
    }

    /// The array readv/writev take.
    pub fn as_raw(iov: &[IoVec]) -> &[libc::iovec] {
        // SAFETY: `IoVec` is a `repr(transparent)` wrapper of
        // `libc::iovec`, so a slice of one is a slice of the other.
        unsafe { std::slice::from_raw_parts(iov.as_ptr().cast(), iov.len()) }
    }
}

/// Appends the host ranges backing guest range `[addr, addr+len)` to `out`
/// (several when it crosses regions). Fails if any byte is outside guest
/// memory: the guest chooses these addresses.
pub fn translate(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u32,
    out: &mut Vec<IoVec>,
) -> Result<(), GuestAddress> {
    let mut addr = addr;
    let mut left = u64::from(len);
    while left > 0 {
        let region = mem.find_region(addr).ok_or(addr)?;
        let offset = addr.checked_offset_from(region.start_addr()).ok_or(addr)?;
        let take = left.min(region.len() - offset);
        let host = region
            .get_host_address(MemoryRegionAddress(offset))
            .map_err(|_| addr)?;
        out.push(IoVec(libc::iovec {
            iov_base: host.cast(),
            iov_len: take as usize,
        }));
        left -= take;
        addr = addr.checked_add(take).ok_or(addr)?;
    }
    Ok(())
}

/// The guest address behind host address `ptr`, if it lies in guest memory.
/// The datapath keeps guest buffers as host ranges; the dirty log wants
/// guest pages.
pub fn host_to_gpa(mem: &GuestMemoryMmap, ptr: *const u8) -> Option<GuestAddress> {
    let addr = ptr as usize;
    mem.iter().find_map(|region| {
        let start = region.as_ptr() as usize;
        let offset = addr.checked_sub(start)?;
        (offset < region.len() as usize).then(|| region.start_addr().unchecked_add(offset as u64))
    })
}
