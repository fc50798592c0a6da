//! Kick and call file descriptors. Frontends hand over eventfds, but UML
//! passes one end of a socketpair as the call fd: both take an 8-byte write
//! and give an 8-byte read, so that is all this assumes.

use std::os::fd::{AsRawFd, BorrowedFd};

/// Signals a call fd. A full pipe/eventfd (EAGAIN) already has a pending
/// notification, so that is not an error; nor is a peer that went away.
pub fn signal(fd: BorrowedFd<'_>) {
    let one = 1u64.to_ne_bytes();
    let _ = nix::unistd::write(fd, &one);
}

/// Consumes pending kicks so a level-triggered poll does not fire again.
pub fn drain(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 64];
    while matches!(nix::unistd::read(fd.as_raw_fd(), &mut buf), Ok(n) if n > 0) {}
}
