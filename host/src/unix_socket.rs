//! Listening UNIX sockets sandnic binds itself (the vhost-user socket, the
//! API, a handover's incoming socket): a path that is in use is left alone,
//! a stale socket replaced, and the file appears only once it listens.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Another process listens there.
    #[error("socket {0} is in use by another process")]
    InUse(PathBuf),
    /// The path names a directory, not a file in one.
    #[error("{0} names no file")]
    NoFileName(PathBuf),
    #[error("binding {path}: {error}")]
    Bind {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Its owner or mode could not be set.
    #[error("{0}")]
    Prepare(#[from] crate::hardening::peer::PeerError),
    #[error("placing {path}: {error}")]
    Place {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Binds a listening socket at `path`. A live socket there is "in use"; a
/// stale one (nobody answers) is replaced; anything else is left alone.
pub fn bind_unix(path: &Path) -> Result<UnixListener, BindError> {
    bind_then(path, |_| Ok(()))
}

/// Binds a socket only sandnic's own user may connect to (the API, a
/// handover's incoming socket): mode 0600, owned by the user sandnic will
/// run as (`--user`; it is still root while it binds).
pub fn bind_private(
    path: &Path,
    owner: Option<crate::hardening::privileges::Target>,
) -> Result<UnixListener, BindError> {
    bind_then(path, |staged| {
        crate::hardening::peer::owner_only(staged, owner)
    })
}

/// Binds under a private name next to `path`, runs `prepare` on it (its
/// owner and mode), and only then renames it to `path`: whoever sees the
/// socket file finds it listening and locked down already. (Bound at
/// `path` itself, the file would appear before `listen` and the
/// permissions: a client that waits for it, as `systemctl reload` does,
/// could be refused.)
fn bind_then(
    path: &Path,
    prepare: impl FnOnce(&Path) -> Result<(), crate::hardening::peer::PeerError>,
) -> Result<UnixListener, BindError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket(path.into()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse(path.into()));
        }
    }
    let name = path
        .file_name()
        .ok_or_else(|| BindError::NoFileName(path.into()))?;
    let staged = path.with_file_name(format!(
        ".{}.{}.binding",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staged);
    let listener = UnixListener::bind(&staged).map_err(|error| BindError::Bind {
        path: path.into(),
        error,
    })?;
    let placed = prepare(&staged).map_err(BindError::from).and_then(|()| {
        std::fs::rename(&staged, path).map_err(|error| BindError::Place {
            path: path.into(),
            error,
        })
    });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    Ok(listener)
}
