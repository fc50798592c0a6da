//! Who is on the other end of a UNIX socket. The control API and the
//! handover stream are doors to the guest's memory (a `swap` runs any
//! component, a `handover` sends the memory and TAP fds away), so only
//! processes of sandnic's own user may use them — and root, which could
//! read sandnic's memory anyway.

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use std::os::fd::AsFd;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The kernel would not say who the peer is.
    #[error("SO_PEERCRED: {0}")]
    Credentials(nix::errno::Errno),
    /// The peer runs as another user.
    #[error("peer pid {pid} runs as uid {uid}, not sandnic's uid {ours}")]
    OtherUser { pid: i32, uid: u32, ours: u32 },
    #[error("chown {path}: {errno}")]
    Chown {
        path: std::path::PathBuf,
        errno: nix::errno::Errno,
    },
    #[error("chmod 600 {path}: {error}")]
    Chmod {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

/// Ok when the peer of `socket` runs as this process's effective uid (or
/// as root).
pub fn same_user(socket: &impl AsFd) -> Result<(), PeerError> {
    let creds = getsockopt(socket, PeerCredentials).map_err(PeerError::Credentials)?;
    let ours = nix::unistd::Uid::effective().as_raw();
    if creds.uid() == ours || creds.uid() == 0 {
        Ok(())
    } else {
        Err(PeerError::OtherUser {
            pid: creds.pid(),
            uid: creds.uid(),
            ours,
        })
    }
}

/// Makes a socket file reachable by its owner only: `owner` (the user
/// sandnic is about to become), or the current user.
pub fn owner_only(path: &Path, owner: Option<super::privileges::Target>) -> Result<(), PeerError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(t) = owner {
        nix::unistd::chown(path, Some(t.uid), Some(t.gid)).map_err(|errno| PeerError::Chown {
            path: path.into(),
            errno,
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|error| {
        PeerError::Chmod {
            path: path.into(),
            error,
        }
    })
}
