//! `--user USER[:GROUP]`: once the TAP queues and the sockets are open,
//! sandnic gives up root: supplementary groups, gid and uid (real, effective
//! and saved), with NO_NEW_PRIVS so nothing it could exec would regain any.
//! Going from root to another uid clears every capability (no keep-caps).

use nix::unistd::{Gid, Group, Uid, User};
use std::str::FromStr;

/// Why `--user` cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("no user {0:?}")]
    NoUser(String),
    #[error("no group {0:?}")]
    NoGroup(String),
    /// The user or group database could not be read.
    #[error("looking up {what:?}: {errno}")]
    Lookup {
        what: String,
        errno: nix::errno::Errno,
    },
    /// A call that gives up privileges failed.
    #[error("{call}: {errno}")]
    Call {
        call: &'static str,
        errno: nix::errno::Errno,
    },
    /// The kernel reported success, but the ids are not the target's.
    #[error("the uid or gid did not change")]
    Unchanged,
    /// setuid(0) still worked: the drop would be for show.
    #[error("root could be regained after dropping it")]
    RootRegainable,
}

/// Who to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub uid: Uid,
    pub gid: Gid,
}

impl FromStr for Target {
    type Err = PrivilegeError;

    /// `USER[:GROUP]`, names or numbers; without a group, the user's own.
    fn from_str(spec: &str) -> Result<Self, PrivilegeError> {
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        let (uid, primary) = resolve_user(user)?;
        let gid = match group {
            Some(g) => resolve_group(g)?,
            None => primary,
        };
        Ok(Self { uid, gid })
    }
}

fn resolve_user(user: &str) -> Result<(Uid, Gid), PrivilegeError> {
    let found = match user.parse::<u32>() {
        Ok(n) => User::from_uid(Uid::from_raw(n)),
        Err(_) => User::from_name(user),
    };
    match found {
        Ok(Some(u)) => Ok((u.uid, u.gid)),
        Ok(None) => user
            .parse::<u32>()
            .map(|n| (Uid::from_raw(n), Gid::from_raw(n)))
            .map_err(|_| PrivilegeError::NoUser(user.into())),
        Err(errno) => Err(PrivilegeError::Lookup {
            what: user.into(),
            errno,
        }),
    }
}

fn resolve_group(group: &str) -> Result<Gid, PrivilegeError> {
    if let Ok(n) = group.parse::<u32>() {
        return Ok(Gid::from_raw(n));
    }
    match Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(PrivilegeError::NoGroup(group.into())),
        Err(errno) => Err(PrivilegeError::Lookup {
            what: group.into(),
            errno,
        }),
    }
}

/// Becomes `target` for good. Must run before any seccomp filter is on
/// (glibc signals every thread to apply setuid) and after everything that
/// needs root is open.
pub fn drop_to(target: Target) -> Result<(), PrivilegeError> {
    let failed = |call| move |errno| PrivilegeError::Call { call, errno };
    nix::unistd::setgroups(&[]).map_err(failed("setgroups"))?;
    nix::unistd::setresgid(target.gid, target.gid, target.gid).map_err(failed("setresgid"))?;
    nix::unistd::setresuid(target.uid, target.uid, target.uid).map_err(failed("setresuid"))?;
    forbid_new_privileges()?;
    if Uid::effective() != target.uid || Gid::effective() != target.gid {
        return Err(PrivilegeError::Unchanged);
    }
    if !target.uid.is_root() && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(PrivilegeError::RootRegainable);
    }
    Ok(())
}

/// PR_SET_NO_NEW_PRIVS: no exec can grant privileges from now on.
pub fn forbid_new_privileges() -> Result<(), PrivilegeError> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes plain integers.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(PrivilegeError::Call {
            call: "PR_SET_NO_NEW_PRIVS",
            errno: nix::errno::Errno::last(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_users_and_groups() {
        let root: Target = "root".parse().unwrap();
        assert_eq!((root.uid.as_raw(), root.gid.as_raw()), (0, 0));
        let numeric: Target = "65534:65534".parse().unwrap();
        assert_eq!((numeric.uid.as_raw(), numeric.gid.as_raw()), (65534, 65534));
        assert!("no-such-user-here".parse::<Target>().is_err());
        assert!("root:no-such-group-here".parse::<Target>().is_err());
    }
}
