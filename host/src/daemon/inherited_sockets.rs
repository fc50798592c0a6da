//! Listening sockets sandnic did not create: handed over by systemd socket
//! activation (`LISTEN_FDS`, picked up with no flag) or named with
//! `--socket-fd N` / `--api-fd N` by a manager that opened them.
//!
//! An fd number is only a claim by whoever started us: each is checked to
//! be an open, listening UNIX stream socket before it is used, and taken
//! at most once. sandnic never removes such a socket's file: its creator
//! owns it.

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_SYSTEMD_FD: RawFd = 3;

/// Most fds accepted from the service manager: the sockets and a stored
/// device (`fd_store::fds_needed` for 128 pairs is 912).
const MAX_INHERITED: RawFd = 1024;

/// The `FileDescriptorName=` of the vhost-user socket unit.
pub const VHOST_USER_NAME: &str = "vhost-user";
/// The `FileDescriptorName=` of the API socket unit.
pub const API_NAME: &str = "api";

/// Why inherited fds cannot be used as they were passed.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("the {0} socket is both socket-activated and given with a flag")]
    Twice(&'static str),
    #[error("--socket-fd and --api-fd name the same fd")]
    SameFd,
    #[error("fd {0} is named twice on the command line")]
    Claimed(RawFd),
    #[error("socket activation passed a socket named {0:?}; sandnic takes {VHOST_USER_NAME:?} and {API_NAME:?}")]
    UnknownName(String),
    #[error("LISTEN_FDS={0:?} is not a count sandnic can use")]
    Count(String),
    #[error("LISTEN_FDNAMES names fewer than {0} fds")]
    TooFewNames(RawFd),
    #[error("two socket-activated fds are named {0:?}")]
    SameName(String),
    /// The fd is not a listening UNIX stream socket sandnic may take.
    #[error("the {what} socket (fd {fd}): {why}")]
    NotAListener {
        what: &'static str,
        fd: RawFd,
        why: String,
    },
}

/// Sockets inherited at start, by role.
#[derive(Debug, Default)]
pub struct InheritedSockets {
    pub vhost_user: Option<UnixListener>,
    pub api: Option<UnixListener>,
    /// Fds a previous sandnic put in the service manager's store
    /// (`daemon::fd_store`), by name: its device, for `serve::restart`.
    pub stored: Vec<(String, OwnedFd)>,
}

/// Collects the sockets of `--socket-fd` / `--api-fd` and of systemd socket
/// activation. Call once, at start. `claimed` are fd numbers taken for
/// something else (`--tap-fd`).
pub fn take(
    socket_fd: Option<RawFd>,
    api_fd: Option<RawFd>,
    claimed: &[RawFd],
) -> Result<InheritedSockets, InheritError> {
    let mut named = systemd_fds()?;
    let mut pick = |flag: Option<RawFd>, name: &'static str| match (flag, named.remove(name)) {
        (Some(_), Some(_)) => Err(InheritError::Twice(name)),
        (Some(fd), None) | (None, Some(fd)) => adopt(fd, name).map(Some),
        (None, None) => Ok(None),
    };
    if socket_fd.is_some() && socket_fd == api_fd {
        return Err(InheritError::SameFd);
    }
    if let Some(fd) = [socket_fd, api_fd]
        .into_iter()
        .flatten()
        .find(|fd| claimed.contains(fd))
    {
        return Err(InheritError::Claimed(fd));
    }
    let mut sockets = InheritedSockets {
        vhost_user: pick(socket_fd, VHOST_USER_NAME)?,
        api: pick(api_fd, API_NAME)?,
        stored: Vec::new(),
    };
    for (name, fd) in named {
        if !name.starts_with(super::fd_store::NAME_PREFIX) {
            return Err(InheritError::UnknownName(name));
        }
        // SAFETY: the service manager passed this fd for sandnic (under a
        // name sandnic stored it with); it is taken once, here.
        sockets
            .stored
            .push((name, unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    Ok(sockets)
}

/// The fds systemd passed, by name (`sd_listen_fds_with_names`): none when
/// `LISTEN_PID` is not this process (the variables were meant for a
/// parent). The variables are removed so that no child takes them too. A
/// single unnamed fd is the vhost-user socket.
fn systemd_fds() -> Result<HashMap<String, RawFd>, InheritError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(HashMap::new());
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(HashMap::new());
    }
    let count: RawFd = count
        .parse()
        .ok()
        .filter(|n| (1..=MAX_INHERITED).contains(n))
        .ok_or(InheritError::Count(count))?;
    let names: Vec<String> = match names {
        Some(names) => names.split(':').map(str::to_string).collect(),
        None => Vec::new(),
    };
    let mut fds = HashMap::new();
    for (i, fd) in (FIRST_SYSTEMD_FD..FIRST_SYSTEMD_FD + count).enumerate() {
        let name = match names.get(i).map(String::as_str) {
            // systemd's name for a socket unit without FileDescriptorName=.
            None | Some("unknown") | Some("") if count == 1 => VHOST_USER_NAME.to_string(),
            Some(name) => name.to_string(),
            None => return Err(InheritError::TooFewNames(count)),
        };
        if fds.insert(name.clone(), fd).is_some() {
            return Err(InheritError::SameName(name));
        }
    }
    Ok(fds)
}

/// Takes `fd` as the listening socket for `what`, once it is shown to be
/// one.
fn adopt(fd: RawFd, what: &'static str) -> Result<UnixListener, InheritError> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, UnixAddr};
    let bad = |why: String| InheritError::NotAListener { what, fd, why };
    if fd < FIRST_SYSTEMD_FD {
        return Err(bad(
            "stdin, stdout and stderr are not sockets to listen on".into()
        ));
    }
    // Fails with EBADF when nothing is open under that number.
    fcntl(fd, FcntlArg::F_GETFD).map_err(|e| bad(format!("not open: {e}")))?;
    // SAFETY: the fd is open (just checked) and is only borrowed for the
    // checks below, within this function.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let listening = getsockopt(&borrowed, sockopt::AcceptConn)
        .map_err(|e| bad(format!("not a socket: {e}")))?;
    let stream = getsockopt(&borrowed, sockopt::SockType).map_err(|e| bad(e.to_string()))?;
    if getsockname::<UnixAddr>(fd).is_err() || stream != SockType::Stream || !listening {
        return Err(bad("not a listening UNIX stream socket".into()));
    }
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| bad(e.to_string()))?;
    // SAFETY: the fd is open (checked above), was handed to this process by
    // whoever started it for sandnic to serve on, and is taken once: `take`
    // refuses the same number for two roles, and nothing else in sandnic
    // opens fds before this runs or refers to these by number.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(UnixListener::from(owned))
}
