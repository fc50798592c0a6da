//! `readv` and `writev` on a TAP queue, as raw system calls.
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
/// # Safety
/// Every `IoVec` must point into guest memory that stays mapped for the
/// call (the kernel reads from it).
pub unsafe fn writev(fd: BorrowedFd<'_>, iov: &[IoVec]) -> isize {
    let raw = IoVec::as_raw(iov);
    // SAFETY: `raw` is a live array of `raw.len()` iovecs; the memory they
    // point to is mapped for the call (the caller's contract).
    unsafe {
        libc::syscall(
            libc::SYS_writev,
            fd.as_raw_fd(),
            raw.as_ptr(),
            raw.len() as libc::c_int,
        ) as isize
    }
}

/// readv(2) from `fd` into `iov`: bytes read, or -1 with errno set.
///
/// # Safety
/// Every `IoVec` must point into device-writable guest memory that stays
/// mapped for the call (the kernel writes up to their total length).
pub unsafe fn readv(fd: BorrowedFd<'_>, iov: &[IoVec]) -> isize {
    let raw = IoVec::as_raw(iov);
    // SAFETY: as in `writev`, and the buffers may be written (the caller's
    // contract).
    unsafe {
        libc::syscall(
            libc::SYS_readv,
            fd.as_raw_fd(),
            raw.as_ptr(),
            raw.len() as libc::c_int,
        ) as isize
    }
}
