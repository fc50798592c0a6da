//! The dirty-page log of a migration (VHOST_F_LOG_ALL with
//! VHOST_USER_PROTOCOL_F_LOG_SHMFD): a bitmap in memory the frontend shares
//! with SET_LOG_BASE, one bit per 4 KiB guest page, bit `page % 8` of byte
//! `page / 8`. While the frontend has LOG_ALL acked, every guest page the
//! backend writes must be marked, or the destination gets a stale copy of
//! it.
//!
//! The frontend chooses the log's size and `log_guest_addr` (the spec lets
//! it lie outside the memory table), so every bit is bounded by the size of
//! the mapping; whether the log covers the memory table is checked once,
//! when it arrives (`DirtyLog::covers`).

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};

/// Size of the page one bit stands for (the spec's VHOST_LOG_PAGE).
pub const LOG_PAGE: u64 = 4096;

/// Largest log accepted: enough for 4 TiB of guest memory. Bounded because
/// the frontend chooses the size and the whole log is mapped.
pub const MAX_LOG_SIZE: u64 = (4 << 40) / LOG_PAGE / 8;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The size is zero or larger than MAX_LOG_SIZE.
    #[error("log size {0} is out of range (1..={MAX_LOG_SIZE})")]
    Size(u64),
    /// The offset is not page aligned or does not fit with the size.
    #[error("log offset {0:#x} is not page aligned or overflows")]
    Offset(u64),
    /// mmap of the log fd failed.
    #[error("mapping the log ({size} bytes at {offset:#x}): {errno}")]
    Map {
        size: u64,
        offset: u64,
        errno: nix::errno::Errno,
    },
}

/// A mapped dirty-page log.
#[derive(Debug)]
pub struct DirtyLog {
    base: NonNull<u8>,
    size: usize,
    /// The fd stays open as long as the mapping (a handover passes it on).
    fd: OwnedFd,
    offset: u64,
}

// SAFETY: the mapping is shared memory touched only through atomic byte
// operations (`mark`), which are safe from any thread; it is unmapped only
// in `Drop`, when no reference is left.
unsafe impl Send for DirtyLog {}
// SAFETY: as above; `&DirtyLog` only allows atomic ORs.
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// Maps `size` bytes of `fd` at `offset` (SET_LOG_BASE's payload).
    pub fn map(fd: OwnedFd, size: u64, offset: u64) -> Result<Self, LogError> {
        if size == 0 || size > MAX_LOG_SIZE {
            return Err(LogError::Size(size));
        }
        let aligned = offset.is_multiple_of(LOG_PAGE);
        let file_offset = libc::off_t::try_from(offset).ok().filter(|_| aligned);
        let Some(file_offset) = file_offset.filter(|o| o.checked_add(size as i64).is_some()) else {
            return Err(LogError::Offset(offset));
        };
        let len = NonZeroUsize::new(size as usize).ok_or(LogError::Size(size))?;
        // SAFETY: a fresh shared mapping of the frontend's log file at an
        // address the kernel chooses; nothing else in this process refers
        // to that range. It is unmapped in Drop.
        let base = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                file_offset,
            )
        }
        .map_err(|errno| LogError::Map {
            size,
            offset,
            errno,
        })?;
        let base = base.cast::<u8>();
        let log = Self {
            base,
            size: size as usize,
            fd,
            offset,
        };
        log.check_backed()?;
        Ok(log)
    }

    /// A mapping past the end of the file maps fine but faults on first
    /// touch (SIGBUS): refuse it now instead of in the datapath.
    fn check_backed(&self) -> Result<(), LogError> {
        let stat = nix::sys::stat::fstat(self.fd.as_raw_fd()).map_err(|errno| LogError::Map {
            size: self.size as u64,
            offset: self.offset,
            errno,
        })?;
        let file_len = u64::try_from(stat.st_size).unwrap_or(0);
        let is_regular = stat.st_mode & libc::S_IFMT == libc::S_IFREG;
        if is_regular && self.offset + self.size as u64 > file_len {
            return Err(LogError::Map {
                size: self.size as u64,
                offset: self.offset,
                errno: nix::errno::Errno::ENXIO,
            });
        }
        Ok(())
    }

    /// Bytes in the log.
    pub fn size(&self) -> u64 {
        self.size as u64
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Whether every page below `end` (an exclusive guest address) has a
    /// bit in the log.
    pub fn covers(&self, end: u64) -> bool {
        end.div_ceil(LOG_PAGE).div_ceil(8) <= self.size as u64
    }

    /// Marks every page of `[gpa, gpa + len)` dirty. Pages past the end of
    /// the log are skipped: `covers` was checked against the memory table,
    /// so only addresses outside it can land there.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let byte = page / 8;
            if byte >= self.size as u64 {
                break;
            }
            // SAFETY: `byte < size`, so the address lies inside the mapping,
            // which lives as long as `self`. AtomicU8 has the size and
            // alignment of u8, and this memory is only accessed atomically
            // here (the frontend clears bits with atomic operations too).
            let cell = unsafe { AtomicU8::from_ptr(self.base.as_ptr().add(byte as usize)) };
            cell.fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: `base..base+size` is the mapping made in `map`, and no
        // reference into it outlives `self`.
        let _ = unsafe { munmap(self.base.cast(), self.size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

    fn memfd(len: i64) -> OwnedFd {
        let fd = memfd_create(c"log", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, len).unwrap();
        fd
    }

    fn bits(log: &DirtyLog) -> Vec<u64> {
        (0..log.size() * 8)
            .filter(|&page| {
                // SAFETY: page / 8 < size: inside the mapping.
                let byte = unsafe { *log.base.as_ptr().add((page / 8) as usize) };
                byte & (1 << (page % 8)) != 0
            })
            .collect()
    }

    #[test]
    fn marks_every_page_of_a_range_and_nothing_else() {
        let log = DirtyLog::map(memfd(4096), 16, 0).unwrap();
        log.mark(3 * LOG_PAGE + 100, 2 * LOG_PAGE);
        assert_eq!(bits(&log), vec![3, 4, 5]);
        log.mark(127 * LOG_PAGE, 1);
        assert_eq!(bits(&log), vec![3, 4, 5, 127]);
    }

    #[test]
    fn bits_past_the_log_are_not_set() {
        let log = DirtyLog::map(memfd(4096), 8, 0).unwrap();
        log.mark(60 * LOG_PAGE, 10 * LOG_PAGE);
        log.mark(u64::MAX - 10, 100);
        assert_eq!(bits(&log), vec![60, 61, 62, 63]);
    }

    #[test]
    fn coverage_is_whole_pages_rounded_to_bytes() {
        let log = DirtyLog::map(memfd(4096), 8, 0).unwrap();
        assert!(log.covers(64 * LOG_PAGE));
        assert!(!log.covers(64 * LOG_PAGE + 1));
    }

    #[test]
    fn bad_bases_are_refused() {
        assert!(matches!(
            DirtyLog::map(memfd(4096), 0, 0),
            Err(LogError::Size(0))
        ));
        assert!(matches!(
            DirtyLog::map(memfd(4096), 8, 100),
            Err(LogError::Offset(100))
        ));
        assert!(matches!(
            DirtyLog::map(memfd(4096), 8, 8192),
            Err(LogError::Map { .. })
        ));
        assert!(matches!(
            DirtyLog::map(memfd(4096), MAX_LOG_SIZE + 1, 0),
            Err(LogError::Size(_))
        ));
    }
}
