//! vhost-user framing: a 12-byte header (request, flags, size), `size` bytes
//! of payload, and file descriptors passed with SCM_RIGHTS alongside.
//!
//! sandnic reads the frontend's socket with its own loop (not the `vhost`
//! crate's request handler) because the negotiated protocol state must be
//! restorable after a live handover, which that handler does not allow.

use crate::fd_passing::{self, PassError};
use nix::errno::Errno;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

pub const HEADER_LEN: usize = 12;
/// Largest payload accepted (the `vhost` crate's MAX_MSG_SIZE). Bounded
/// because the frontend chooses `size`.
pub const MAX_PAYLOAD: usize = 0x1000;
/// Most fds one message may carry (MAX_ATTACHED_FD_ENTRIES).
pub const MAX_FDS: usize = 32;

pub const VERSION: u32 = 0x1;
pub const REPLY: u32 = 0x4;
pub const NEED_REPLY: u32 = 0x8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
}

impl Header {
    fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0; HEADER_LEN];
        b[0..4].copy_from_slice(&self.request.to_ne_bytes());
        b[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        b[8..12].copy_from_slice(&self.size.to_ne_bytes());
        b
    }

    fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Self {
            request: word(0),
            flags: word(4),
            size: word(8),
        }
    }

    pub fn needs_reply(&self) -> bool {
        self.flags & NEED_REPLY != 0
    }
}

/// One message with the fds that came with it (owned: dropped = closed).
#[derive(Debug)]
pub struct Message {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed the connection.
    #[error("connection closed by the peer")]
    Closed,
    /// A header that no vhost-user peer sends: wrong version bits, reserved
    /// flags, or a payload larger than allowed.
    #[error("malformed header {0:?}")]
    BadHeader(Header),
    /// More fds than a message may carry, or truncated control data.
    #[error("too many file descriptors attached")]
    TooManyFds,
    /// The payload ended early.
    #[error("payload truncated ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("socket error: {0}")]
    Io(Errno),
}

/// Reads one message. Blocks until it is complete; the socket should have a
/// receive timeout so a peer that stops mid-message cannot hang the caller.
pub fn recv(sock: BorrowedFd<'_>) -> Result<Message, WireError> {
    let mut hdr = [0u8; HEADER_LEN];
    let mut fds = Vec::new();
    let got = recv_with_fds(sock, &mut hdr, &mut fds)?;
    if got == 0 {
        return Err(WireError::Closed);
    }
    if got < HEADER_LEN {
        read_exact(sock, &mut hdr[got..], got)?;
    }
    let header = Header::from_bytes(&hdr);
    if header.flags & 0x3 != VERSION
        || header.flags & !0xf != 0
        || header.size as usize > MAX_PAYLOAD
    {
        return Err(WireError::BadHeader(header));
    }
    let mut payload = vec![0u8; header.size as usize];
    read_exact(sock, &mut payload, 0)?;
    Ok(Message {
        header,
        payload,
        fds,
    })
}

fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, WireError> {
    let got = fd_passing::recv(sock, buf, fds).map_err(|e| match e {
        PassError::ControlTruncated => WireError::TooManyFds,
        PassError::Io(errno) => WireError::Io(errno),
    })?;
    if fds.len() > MAX_FDS {
        return Err(WireError::TooManyFds);
    }
    Ok(got)
}

fn read_exact(sock: BorrowedFd<'_>, buf: &mut [u8], already: usize) -> Result<(), WireError> {
    let mut done = 0;
    while done < buf.len() {
        match nix::unistd::read(sock.as_raw_fd(), &mut buf[done..]) {
            Ok(0) => {
                return Err(WireError::Truncated {
                    got: already + done,
                    want: already + buf.len(),
                })
            }
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                return Err(WireError::Truncated {
                    got: already + done,
                    want: already + buf.len(),
                })
            }
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(())
}

/// Sends one message with `fds` attached.
pub fn send(
    sock: BorrowedFd<'_>,
    header: Header,
    payload: &[u8],
    fds: &[RawFd],
) -> Result<(), WireError> {
    let hdr = header.to_bytes();
    fd_passing::send(sock, &[&hdr, payload], fds).map_err(WireError::Io)
}

/// A reply to `request`: flags VERSION|REPLY, exactly as frontends check.
pub fn reply(sock: BorrowedFd<'_>, request: u32, payload: &[u8]) -> Result<(), WireError> {
    send(
        sock,
        Header {
            request,
            flags: VERSION | REPLY,
            size: payload.len() as u32,
        },
        payload,
        &[],
    )
}
