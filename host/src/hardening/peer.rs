//! Who is on the other end of a UNIX socket. The control API and the
//! handover stream are doors to the guest's memory (a `swap` runs any
//! component, a `handover` sends the memory and TAP fds away), so only
//! processes of sandnic's own user may use them — and root, which could
//! read sandnic's memory anyway.

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use std::os::fd::AsFd;
use std::path::Path;

/// Ok when the peer of `socket` runs as this process's effective uid (or
/// as root).
pub fn same_user(socket: &impl AsFd) -> Result<(), String> {
    let creds = getsockopt(socket, PeerCredentials).map_err(|e| format!("SO_PEERCRED: {e}"))?;
    let me = nix::unistd::Uid::effective().as_raw();
    if creds.uid() == me || creds.uid() == 0 {
        Ok(())
    } else {
        Err(format!(
            "peer pid {} runs as uid {}, not sandnic's uid {me}",
            creds.pid(),
            creds.uid()
        ))
    }
}

/// Makes a socket file reachable by its owner only: `owner` (the user
/// sandnic is about to become), or the current user.
pub fn owner_only(path: &Path, owner: Option<super::privileges::Target>) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(t) = owner {
        nix::unistd::chown(path, Some(t.uid), Some(t.gid))
            .map_err(|e| format!("chown {}: {e}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod 600 {}: {e}", path.display()))
}
