//! The handover stream: length-prefixed msgpack frames over a UNIX stream
//! socket, with file descriptors passed alongside (SCM_RIGHTS) in frames of
//! their own.
//!
//! Everything read here comes from another process and is untrusted: frame
//! sizes and fd counts are bounded, every read has a deadline, and a frame
//! that does not decode is an error, never a panic.

use crate::fd_passing::{self, PassError, MAX_FDS_PER_MESSAGE};
use nix::errno::Errno;
use serde::{de::DeserializeOwned, Serialize};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Stream magic ("sandnic handover") and the format version this build
/// speaks.
pub const MAGIC: &str = "sandnic-handover";
pub const VERSION: u32 = 2;
/// Largest frame accepted: the offer, with a component that is not built
/// into sandnic (at most `MAX_COMPONENT_BYTES`) and the host state; the
/// commit's device state is 64 KiB at most.
pub const MAX_FRAME: usize = crate::sandbox::MAX_COMPONENT_BYTES + (1 << 20);
/// fds per frame: as many as one message may carry.
pub const FDS_PER_FRAME: usize = MAX_FDS_PER_MESSAGE;
/// Most fds one handover may carry: a connection, two listeners, a backend
/// channel, 32 memory regions, three per virtqueue and one per TAP queue for
/// 256 queue pairs.
pub const MAX_FDS: usize = 4 + 32 + 3 * (2 * 256 + 1) + 256;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The peer closed the stream (or died) before the frame was complete.
    #[error("handover peer closed the stream")]
    Closed,
    /// No data within the deadline.
    #[error("handover peer timed out")]
    Timeout,
    /// A frame larger than allowed, or one that does not decode.
    #[error("malformed handover frame: {0}")]
    Malformed(String),
    /// More fds than announced or allowed, or control data cut short.
    #[error("bad file descriptors in the handover stream: {0}")]
    Fds(String),
    #[error("handover socket: {0}")]
    Io(Errno),
}

/// Sends one value as a frame.
pub fn send<T: Serialize>(sock: &UnixStream, value: &T) -> Result<(), StreamError> {
    let body = rmp_serde::to_vec_named(value).map_err(|e| StreamError::Malformed(e.to_string()))?;
    let len = (body.len() as u32).to_le_bytes();
    send_all(sock, &[&len, &body], &[])
}

/// Receives one frame and decodes it as `T`.
pub fn recv<T: DeserializeOwned>(sock: &UnixStream, timeout: Duration) -> Result<T, StreamError> {
    sock.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut len = [0u8; 4];
    recv_exact(sock, &mut len, &mut Vec::new())?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(StreamError::Malformed(format!(
            "frame of {len} bytes (at most {MAX_FRAME})"
        )));
    }
    let mut body = vec![0u8; len];
    recv_exact(sock, &mut body, &mut Vec::new())?;
    rmp_serde::from_slice(&body).map_err(|e| StreamError::Malformed(e.to_string()))
}

/// Sends `fds` in frames of at most FDS_PER_FRAME; each frame's one data
/// byte is the count it carries.
pub fn send_fds(sock: &UnixStream, fds: &[RawFd]) -> Result<(), StreamError> {
    for chunk in fds.chunks(FDS_PER_FRAME) {
        send_all(sock, &[&[chunk.len() as u8]], chunk)?;
    }
    Ok(())
}

/// Receives exactly `count` fds sent by `send_fds`.
pub fn recv_fds(
    sock: &UnixStream,
    count: usize,
    timeout: Duration,
) -> Result<Vec<OwnedFd>, StreamError> {
    if count > MAX_FDS {
        return Err(StreamError::Fds(format!(
            "{count} fds announced (at most {MAX_FDS})"
        )));
    }
    sock.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut fds = Vec::with_capacity(count);
    while fds.len() < count {
        let mut n = [0u8; 1];
        let before = fds.len();
        recv_exact(sock, &mut n, &mut fds)?;
        let got = fds.len() - before;
        if got != usize::from(n[0]) || fds.len() > count {
            return Err(StreamError::Fds(format!(
                "frame says {} fds, carried {got}",
                n[0]
            )));
        }
    }
    Ok(fds)
}

fn io(e: std::io::Error) -> StreamError {
    StreamError::Io(Errno::from_raw(e.raw_os_error().unwrap_or(0)))
}

fn send_all(sock: &UnixStream, parts: &[&[u8]], fds: &[RawFd]) -> Result<(), StreamError> {
    fd_passing::send(sock.as_fd(), parts, fds).map_err(|e| match e {
        Errno::EPIPE | Errno::ECONNRESET => StreamError::Closed,
        e => StreamError::Io(e),
    })
}

/// Fills `buf`, collecting any fds that arrive on the way into `fds`.
fn recv_exact(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<(), StreamError> {
    let mut done = 0;
    while done < buf.len() {
        let got = match fd_passing::recv(sock.as_fd(), &mut buf[done..], fds) {
            Ok(0) => return Err(StreamError::Closed),
            Ok(n) => n,
            Err(PassError::ControlTruncated) => {
                return Err(StreamError::Fds("control data truncated".into()))
            }
            Err(PassError::Io(Errno::EAGAIN)) => return Err(StreamError::Timeout),
            Err(PassError::Io(Errno::ECONNRESET)) => return Err(StreamError::Closed),
            Err(PassError::Io(e)) => return Err(StreamError::Io(e)),
        };
        done += got;
    }
    Ok(())
}
