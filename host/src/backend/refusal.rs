//! Why the backend refuses a frontend's request, or ends its connection.
//!
//! vhost-user carries no reason back (a failed ack is one bit), so these
//! reach the log and the `bad_requests` counter; the type keeps each
//! reason distinct for tests and for what is counted.

use super::rings::OtherSessionDrives;
use super::SessionId;
use crate::memory::dirty_log::LogError;
use crate::memory::guest_memory::MemoryError;
use crate::sandbox::DeviceError;
use crate::vhost_user::request::RequestError;
use nix::errno::Errno;

/// A request refused (answered as failed), or a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// A request came for a session the backend does not hold.
    #[error("no session {0}")]
    NoSession(SessionId),
    /// A standby asked for a change to the device another session drives.
    #[error("{0}: {OtherSessionDrives}")]
    Standby(&'static str),
    /// A ring index beyond the device's rings.
    #[error("ring {index} does not exist ({rings} rings)")]
    NoRing { index: u32, rings: usize },
    /// A ring size that does not fit the ring's 16-bit size.
    #[error("ring size {0}")]
    RingSize(u32),
    /// A ring base that does not fit the ring's 16-bit index.
    #[error("ring base {0}")]
    RingBase(u32),
    /// SET_VRING_KICK without an fd asks for polling, which is not served.
    #[error("polling without a kick fd is not supported")]
    NoKickFd,
    /// The datapath waits for kicks in epoll: an fd epoll refuses (a
    /// regular file, a memfd) would leave the ring's thread unable to
    /// wait at all.
    #[error("the kick fd cannot be polled ({0})")]
    KickNotPollable(Errno),
    /// An eventfd could not be made non-blocking.
    #[error("cannot make the fd non-blocking: {0}")]
    Fcntl(Errno),
    /// The ring may not start: another session drives the device.
    #[error("ring {index}: {OtherSessionDrives}")]
    RingOfStandby { index: u32 },
    /// SET_VRING_ENABLE before the protocol features that define it.
    #[error("SET_VRING_ENABLE without protocol features")]
    EnableWithoutProtocolFeatures,
    /// The device model refused or failed the features.
    #[error("features {acked:#x}: {error}")]
    Features { acked: u64, error: DeviceError },
    /// The device model refused or failed a config read.
    #[error("config read at {offset} of {size} bytes: {error}")]
    ConfigRead {
        offset: u32,
        size: u32,
        error: DeviceError,
    },
    /// The device model refused or failed a config write.
    #[error("config write: {0}")]
    ConfigWrite(DeviceError),
    /// The memory table could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A request code the backend does not serve.
    #[error("unsupported request {0}")]
    Unsupported(u32),
    /// SEND_RARP for an address that is not unicast.
    #[error("SEND_RARP: {0} is not a unicast MAC")]
    RarpNotUnicast(String),
    /// SEND_RARP with no TAP queue to send on.
    #[error("SEND_RARP: no TAP queue")]
    RarpNoTap,
    /// The TAP refused the announcement.
    #[error("SEND_RARP: writing to the TAP: {0}")]
    RarpWrite(Errno),
    /// A request that did not parse.
    #[error(transparent)]
    Malformed(RequestError),
    // The reasons below end the connection: a dirty log that cannot be
    // kept cannot be refused either (the frontend would not notice), and
    // going on would let a migration complete with pages unlogged.
    /// The log could not be mapped.
    #[error("SET_LOG_BASE: {0}")]
    LogMap(#[from] LogError),
    /// A log too small for guest memory.
    #[error("the dirty log ({size} bytes) does not cover guest memory up to {end:#x}")]
    LogShort { size: u64, end: u64 },
    /// A SET_LOG_BASE that did not parse.
    #[error("malformed SET_LOG_BASE: {0}")]
    MalformedLogBase(RequestError),
}
