//! Readiness notifications to the service manager (systemd's `sd_notify`
//! protocol: `KEY=VALUE` lines in one datagram to `$NOTIFY_SOCKET`).
//!
//! Why it matters beyond start-up: after a handover the new process says
//! `MAINPID=` itself, so that systemd (`NotifyAccess=all`) follows the
//! device to it and the old process's exit does not end the service.

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
        let target = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name).map_err(bad)?
            }
            None => SocketAddr::from_pathname(&value).map_err(bad)?,
        };
        let socket = UnixDatagram::unbound().map_err(bad)?;
        Ok(Some(Self { socket, target }))
    }

    /// Serving: this process is the service's main process.
    pub fn ready(&self) {
        self.send(&format!(
            "READY=1\nMAINPID={}\nSTATUS=serving",
            std::process::id()
        ));
    }

    /// Shutting down on a signal.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=shutting down");
    }

    /// A lost notification is logged, never fatal: the device serves the
    /// guest whatever the service manager hears.
    fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.target) {
            tracing::warn!("notifying the service manager: {e}");
        }
    }
}
