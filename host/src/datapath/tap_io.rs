//! `readv` and `writev` (or `write`) on a TAP queue, as raw system calls.
//!
//! glibc's wrappers are cancellation points: each call switches the thread's
//! asynchronous cancellation on and off around the system call, two atomic
//! read-modify-writes. With one call per frame that was 8 % of a TX thread's
//! time in a profile under DPDK's virtio_user at 1.9 M frames/s. sandnic
//! never cancels a thread, so the datapath calls the kernel directly.

use crate::memory::guest_memory::IoVec;
use std::os::fd::{AsRawFd, BorrowedFd};

/// writev(2) of `iov` to `fd`: bytes written, or -1 with errno set.
///
/// A frame in one piece (every small chain, which TX copies out of guest
/// memory) goes with write(2): writev first copies the iovec array in from user memory,
/// about 4 % of a TX thread's time at 64 B in a profile under DPDK's
/// virtio_user.
///
/// # Safety
/// Every entry must point to memory that stays mapped for the call (the
/// kernel reads from it): guest memory, or the sender's own buffers.
pub unsafe fn writev(fd: BorrowedFd<'_>, iov: &[libc::iovec]) -> isize {
    if let [one] = iov {
        // SAFETY: `one` points to `iov_len` readable bytes that stay mapped
        // for the call (the caller's contract).
        return unsafe {
            libc::syscall(libc::SYS_write, fd.as_raw_fd(), one.iov_base, one.iov_len) as isize
        };
    }
    // SAFETY: the caller's contract is writev's.
    unsafe { vectored(libc::SYS_writev, fd, iov) }
}

/// readv(2) from `fd` into `iov`: bytes read, or -1 with errno set.
///
/// # Safety
/// Every `IoVec` must point into device-writable guest memory that stays
/// mapped for the call (the kernel writes up to their total length).
pub unsafe fn readv(fd: BorrowedFd<'_>, iov: &[IoVec]) -> isize {
    // SAFETY: the caller's contract is readv's.
    unsafe { vectored(libc::SYS_readv, fd, IoVec::as_raw(iov)) }
}

/// System call `nr` (readv or writev) on `fd` with `iov`.
///
/// # Safety
/// As `readv` or `writev`, whichever `nr` is.
unsafe fn vectored(nr: libc::c_long, fd: BorrowedFd<'_>, iov: &[libc::iovec]) -> isize {
    // SAFETY: `iov` is a live array of `iov.len()` iovecs; the memory they
    // point to is mapped for the call, and writable for readv (the
    // caller's contract).
    unsafe { libc::syscall(nr, fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) as isize }
}
