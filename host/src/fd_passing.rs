//! Where fds are passed: bytes with file descriptors attached (SCM_RIGHTS)
//! over a UNIX stream socket, both ways. The vhost-user connection and the
//! handover stream both go through here.
//!
//! Received fds are owned at once (closed on any later error), control data
//! is bounded (MAX_FDS_PER_MESSAGE: the peer chooses how many it attaches)
//! and is received close-on-exec.

use nix::cmsg_space;
use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Most fds accepted with one message (the kernel allows 253); more, and
/// the control data is cut short, which is an error.
pub const MAX_FDS_PER_MESSAGE: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PassError {
    /// More fds than MAX_FDS_PER_MESSAGE came with one message.
    #[error("control data truncated (more than {MAX_FDS_PER_MESSAGE} fds attached)")]
    ControlTruncated,
    #[error("{0}")]
    Io(Errno),
}

/// One `recvmsg` into `buf`, appending the fds that came with it to `fds`.
/// Returns the bytes read: 0 when the peer closed the socket.
pub fn recv(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, PassError> {
    let mut space = cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            other => break other.map_err(PassError::Io)?,
        }
    };
    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    for cmsg in msg.cmsgs().map_err(PassError::Io)? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these fds in our table for
            // us (SCM_RIGHTS); nothing else owns them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if truncated {
        return Err(PassError::ControlTruncated);
    }
    Ok(msg.bytes)
}

/// Longest a datagram to the service manager may wait for room: its
/// socket's queue is short (10 datagrams), and a manager that does not
/// read must not stop the device (the control thread sends these).
const DATAGRAM_PATIENCE_MS: u64 = 1000;

/// Sends one datagram, `bytes` with `fds` attached, from the unbound
/// datagram socket `sock` to `to` (the service manager's notify socket).
/// Waits for room in the receiver's queue for DATAGRAM_PATIENCE_MS at
/// most, then fails with EAGAIN.
pub fn send_datagram(
    sock: BorrowedFd<'_>,
    to: &UnixAddr,
    bytes: &[u8],
    fds: &[RawFd],
) -> Result<(), Errno> {
    let iov = [IoSlice::new(bytes)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() {
        &[]
    } else {
        &[ControlMessage::ScmRights(fds)]
    };
    let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_millis(DATAGRAM_PATIENCE_MS);
    loop {
        match sendmsg(sock.as_raw_fd(), &iov, cmsgs, flags, Some(to)) {
            Err(Errno::EINTR) => continue,
            // An unbound sender polls writable whatever the receiver's
            // queue holds: wait a little and try again.
            Err(Errno::EAGAIN) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other.map(drop),
        }
    }
}

/// Sends all of `parts` (one message, gathered), with `fds` attached to its
/// first bytes. A stream socket may take part of a message; the rest goes
/// plainly.
pub fn send(sock: BorrowedFd<'_>, parts: &[&[u8]], fds: &[RawFd]) -> Result<(), Errno> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let iov: Vec<IoSlice> = parts.iter().map(|p| IoSlice::new(p)).collect();
    let cmsgs: &[ControlMessage] = if fds.is_empty() {
        &[]
    } else {
        &[ControlMessage::ScmRights(fds)]
    };
    let sent = loop {
        match sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(Errno::EINTR) => continue,
            other => break other?,
        }
    };
    if sent < total {
        let rest = parts.concat();
        let mut off = sent;
        while off < rest.len() {
            match nix::sys::socket::send(sock.as_raw_fd(), &rest[off..], MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => off += n,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
