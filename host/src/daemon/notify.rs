//! Readiness notifications to the service manager (systemd's `sd_notify`
//! protocol: `KEY=VALUE` lines in one datagram to `$NOTIFY_SOCKET`).
//!
//! Why it matters beyond start-up: after a handover the new process says
//! `MAINPID=` itself, so that systemd (`NotifyAccess=all`) follows the
//! device to it and the old process's exit does not end the service.

use nix::sys::socket::UnixAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// `$NOTIFY_SOCKET` names no socket this process can send to.
#[derive(Debug, thiserror::Error)]
#[error("NOTIFY_SOCKET={value:?}: {error}")]
pub struct NotifySocketError {
    value: std::ffi::OsString,
    error: std::io::Error,
}

/// A socket to the service manager, made at start (before the seccomp
/// filters, which allow sending but not creating sockets of this kind).
pub struct Notifier {
    socket: UnixDatagram,
    target: SocketAddr,
    /// The same address for `sendmsg` (fds attached: the fd store).
    target_addr: UnixAddr,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET` (a path, or an abstract name written with a
    /// leading `@`); None when no service manager listens. The variable is
    /// removed so that no child process speaks for sandnic.
    pub fn from_env() -> Result<Option<Self>, NotifySocketError> {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        std::env::remove_var("NOTIFY_SOCKET");
        let bad = |error| NotifySocketError {
            value: value.clone(),
            error,
        };
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(value.as_os_str());
        let errno = |e: nix::errno::Errno| std::io::Error::from(e);
        let (target, target_addr) = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                (
                    SocketAddr::from_abstract_name(name).map_err(bad)?,
                    UnixAddr::new_abstract(name).map_err(|e| bad(errno(e)))?,
                )
            }
            None => (
                SocketAddr::from_pathname(&value).map_err(bad)?,
                UnixAddr::new(std::path::Path::new(&value)).map_err(|e| bad(errno(e)))?,
            ),
        };
        let socket = UnixDatagram::unbound().map_err(bad)?;
        Ok(Some(Self {
            socket,
            target,
            target_addr,
        }))
    }

    /// Serving: this process is the service's main process.
    pub fn ready(&self) {
        self.send(&format!(
            "READY=1\nMAINPID={}\nSTATUS=serving",
            std::process::id()
        ));
    }

    /// A handover's destination is the service's main process from now on:
    /// said before it tells the source it runs (after which the source
    /// exits), so that the manager never sees the main process exit with
    /// no successor named. systemd reads notifications before it reaps.
    pub fn main_pid(&self) {
        self.send(&format!("MAINPID={}", std::process::id()));
    }

    /// Shutting down on a signal.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=shutting down");
    }

    /// Puts `fd` in the service manager's fd store under `name`
    /// (`FDSTORE=1`); `poll: false` asks it not to drop the fd when it
    /// reports POLLHUP or POLLERR (`FDPOLL=0`: a detached TAP queue does).
    /// The manager answers nothing, whether it kept the fd or not.
    pub fn store_fd(&self, name: &str, fd: BorrowedFd<'_>, poll: bool) -> nix::Result<()> {
        let message = format!(
            "FDSTORE=1\nFDNAME={name}{}",
            if poll { "" } else { "\nFDPOLL=0" }
        );
        use std::os::fd::AsRawFd;
        crate::fd_passing::send_datagram(
            self.socket.as_fd(),
            &self.target_addr,
            message.as_bytes(),
            &[fd.as_raw_fd()],
        )
    }

    /// Takes the fds stored under `name` out of the store (`FDSTOREREMOVE`):
    /// the manager closes its copies.
    pub fn remove_fds(&self, name: &str) -> nix::Result<()> {
        let message = format!("FDSTOREREMOVE=1\nFDNAME={name}");
        crate::fd_passing::send_datagram(
            self.socket.as_fd(),
            &self.target_addr,
            message.as_bytes(),
            &[],
        )
    }

    /// A lost notification is logged, never fatal: the device serves the
    /// guest whatever the service manager hears.
    fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.target) {
            tracing::warn!("notifying the service manager: {e}");
        }
    }
}
